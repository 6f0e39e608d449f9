"""The ``triton`` selective-scan backend (CUDA, inference); reference twin: ``stm_ref.ssm.selective_scan``.

One program per (batch item, block of channels) walks the sequence, keeping the (BLOCK_D, N) state
in registers: Abar = exp2(delta * A * log2 e), h = Abar*h + delta*u*B, y = (C·h + D*u) * silu(z).
B and C are read through four strides (batch, channel, state, time), so the (batch, N, L), (D, N)
and grouped layouts need no copies (a stride of 0 broadcasts). Runs on CUDA; on CPU tensors only
under ``TRITON_INTERPRET=1`` (set before this module is imported), which the tests use.
Softplus and the delta bias are applied by the caller (one elementwise pass), so the kernel's
arithmetic is exactly the recurrence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..runtime import compute_dtype
from .common import bc_layout

__all__ = ["selective_scan_triton"]


@triton.jit
def _selective_scan_fwd(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, y_ptr, last_ptr, scale_ptr,
    Dm, L, N,
    s_ub, s_ud, s_ul,
    s_Bb, s_Bd, s_Bn, s_Bl,
    s_Cb, s_Cd, s_Cn, s_Cl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < Dm
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A2 = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0) * 1.4426950408889634
    if HAS_D:
        Dp = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=A2.dtype)
    u_base = u_ptr + pid_b * s_ub + offs_d * s_ud
    d_base = delta_ptr + pid_b * s_ub + offs_d * s_ud
    z_base = z_ptr + pid_b * s_ub + offs_d * s_ud
    y_base = y_ptr + pid_b * s_ub + offs_d * s_ud
    B_base = B_ptr + pid_b * s_Bb + offs_d[:, None] * s_Bd + offs_n[None, :] * s_Bn
    C_base = C_ptr + pid_b * s_Cb + offs_d[:, None] * s_Cd + offs_n[None, :] * s_Cn
    for t in range(0, L):
        u = tl.load(u_base + t * s_ul, mask=mask_d, other=0.0)
        dt = tl.load(d_base + t * s_ul, mask=mask_d, other=0.0)
        Bt = tl.load(B_base + t * s_Bl, mask=mask_dn, other=0.0)
        Ct = tl.load(C_base + t * s_Cl, mask=mask_dn, other=0.0)
        if HAS_SCALE:
            sc = tl.load(scale_ptr + pid_b * L + t)
            dA = tl.exp2((dt * sc)[:, None] * A2)
        else:
            dA = tl.exp2(dt[:, None] * A2)
        h = dA * h + (dt * u)[:, None] * Bt
        y = tl.sum(h * Ct, axis=1)
        if HAS_D:
            y = y + Dp * u
        if HAS_Z:
            zt = tl.load(z_base + t * s_ul, mask=mask_d, other=0.0)
            y = y * (zt / (1.0 + tl.exp(-zt)))
        tl.store(y_base + t * s_ul, y, mask=mask_d)
    tl.store(last_ptr + pid_b * Dm * N + offs_d[:, None] * N + offs_n[None, :], h, mask=mask_dn)


def _strides_BC(M, batch, D, N, L, name):
    """(tensor, strides over batch, channel, state, time) for the three B/C layouts (a stride of 0 broadcasts)."""
    layout = bc_layout(M, batch, D, N, L, name)
    if layout == "fixed":
        return M, (0, M.stride(0), M.stride(1), 0)
    if layout == "variable":
        return M, (M.stride(0), 0, M.stride(1), M.stride(2))
    M = M.repeat_interleave(D // M.shape[1], dim=1).contiguous()
    return M, (M.stride(0), M.stride(1), M.stride(2), M.stride(3))


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, block_d=None, decay_scale=None):
    """Same contract as ``stm_fast.ssm.selective_scan``; computes in float32 (float64 if any input is)."""
    batch, Dm, L = u.shape
    N = A.shape[1]
    ct = compute_dtype(u, delta, A, B, C)
    dtype_in = u.dtype
    delta = delta.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    u = u.to(ct).contiguous()
    delta = delta.contiguous()
    A = A.to(ct).contiguous()
    Bc, sB = _strides_BC(B.to(ct), batch, Dm, N, L, "B")
    Cc, sC = _strides_BC(C.to(ct), batch, Dm, N, L, "C")
    Dp = D.to(ct).contiguous() if D is not None else A  # placeholder pointer when absent
    zc = z.to(ct).contiguous() if z is not None else u
    y = torch.empty_like(u)
    last = torch.empty(batch, Dm, N, dtype=ct, device=u.device)
    scale = decay_scale.to(ct).contiguous() if decay_scale is not None else u
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_D = block_d or min(triton.next_power_of_2(Dm), 32)
    grid = (batch, triton.cdiv(Dm, BLOCK_D))
    _selective_scan_fwd[grid](
        u, delta, A, Bc, Cc, Dp, zc, y, last, scale,
        Dm, L, N,
        u.stride(0), u.stride(1), u.stride(2),
        *sB, *sC,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_SCALE=decay_scale is not None,
        BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
    )
    y = y.to(dtype_in)
    return (y, last) if return_last_state else y
