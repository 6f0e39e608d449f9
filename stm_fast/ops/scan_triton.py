"""The ``triton`` selective-scan backend (CUDA, inference); reference twin: ``stm_ref.ssm.selective_scan``.

One program per (batch item, block of channels) walks the sequence, keeping the (BLOCK_D, N) state
in registers: Abar = exp2(delta * A * log2 e), h = Abar*h + delta*u*B, y = (C·h + D*u) * silu(z).
B and C are read through four strides (batch, group, state, time) and a group size, so the (batch, N, L),
(D, N) and grouped layouts need no copies (a stride of 0 broadcasts); u, delta, z and y each have their
own strides, so the channel-last rows Vim's mixer makes are read as they are (contiguous over channels).
Program ids are 64-bit, so offsets do not overflow for batch * D * L >= 2^31. Runs on CUDA; on CPU tensors only
under ``TRITON_INTERPRET=1`` (set before this module is imported), which the tests use.
Softplus and the delta bias are applied by the caller (one elementwise pass), so the kernel's
arithmetic is exactly the recurrence.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..runtime import compute_dtype
from .conv import conv  # noqa: F401  (this backend's conv: the torch one)
from .common import ScanCall, ScanOutput, bc_layout, channel_last, reversed_by_flipping

__all__ = ["selective_scan_triton", "check_triton", "scan", "check", "conv"]


@triton.jit
def _selective_scan_fwd(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, y_ptr, last_ptr, scale_ptr,
    Dm, L, N, DPG_B, DPG_C,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_yb, s_yd, s_yl,
    s_Bb, s_Bg, s_Bn, s_Bl,
    s_Cb, s_Cg, s_Cn, s_Cl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # 64-bit program ids: batch * D * L can pass 2^31 (Vim-B at 730 tokens from batch ~1,800), and
    # i32 products of ids and strides would wrap silently
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
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
    d_base = delta_ptr + pid_b * s_db + offs_d * s_dd
    z_base = z_ptr + pid_b * s_zb + offs_d * s_zd
    y_base = y_ptr + pid_b * s_yb + offs_d * s_yd
    # channel d reads B/C group d // (D / G): grouped layouts are indexed, not copied
    B_base = B_ptr + pid_b * s_Bb + (offs_d // DPG_B)[:, None] * s_Bg + offs_n[None, :] * s_Bn
    C_base = C_ptr + pid_b * s_Cb + (offs_d // DPG_C)[:, None] * s_Cg + offs_n[None, :] * s_Cn
    for t in range(0, L):
        u = tl.load(u_base + t * s_ul, mask=mask_d, other=0.0)
        dt = tl.load(d_base + t * s_dl, mask=mask_d, other=0.0)
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
            zt = tl.load(z_base + t * s_zl, mask=mask_d, other=0.0)
            y = y * (zt / (1.0 + tl.exp(-zt)))
        tl.store(y_base + t * s_yl, y, mask=mask_d)
    tl.store(last_ptr + pid_b * Dm * N + offs_d[:, None] * N + offs_n[None, :], h, mask=mask_dn)


def _strides_BC(M, batch, D, N, L, name):
    """(channels per group, strides over batch, group, state, time) of a B/C layout: (D, N) is D groups of
    one channel with no batch or time stride, (batch, N, L) one group, (batch, G, N, L) G groups."""
    layout = bc_layout(M, batch, D, N, L, name)
    if layout == "fixed":
        return 1, (0, M.stride(0), M.stride(1), 0)
    if layout == "variable":
        return D, (M.stride(0), 0, M.stride(1), M.stride(2))
    return D // M.shape[1], (M.stride(0), M.stride(1), M.stride(2), M.stride(3))


def _same_device(device, *tensors):
    bad = [t.device for t in tensors if t is not None and t.device != device]
    if bad:
        raise ValueError(f"selective_scan (triton): every input must be on {device}, found {bad[0]}")


def _launch_guard(device):
    """Triton launches on the current CUDA device and stream: make that the inputs' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _output_like(u, dtype):
    """y in u's memory layout: channel-last rows when u is channel-last (coalesced loads and stores)."""
    batch, D, L = u.shape
    if channel_last(u) and D > 1:
        return torch.empty(batch, L, D, dtype=dtype, device=u.device).transpose(1, 2)
    return torch.empty(batch, D, L, dtype=dtype, device=u.device)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, block_d=None, decay_scale=None):
    """Same contract as ``stm_fast.ssm.selective_scan``; computes in float32 (float64 if any input is).
    Inference only: the output has no gradient (``stm_fast.ssm`` never picks this backend when one is needed)."""
    batch, Dm, L = u.shape
    N = A.shape[1]
    _same_device(u.device, delta, A, B, C, D, z, delta_bias, decay_scale)
    ct = compute_dtype(u, delta, A, B, C)
    dtype_in = u.dtype
    delta = delta.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    u, A, Bc, Cc = u.to(ct), A.to(ct).contiguous(), B.to(ct), C.to(ct)
    dpg_b, sB = _strides_BC(Bc, batch, Dm, N, L, "B")
    dpg_c, sC = _strides_BC(Cc, batch, Dm, N, L, "C")
    Dp = D.to(ct).contiguous() if D is not None else A  # placeholder pointer when absent
    zc = z.to(ct) if z is not None else u
    y = _output_like(u, ct)
    last = torch.empty(batch, Dm, N, dtype=ct, device=u.device)
    scale = decay_scale.to(ct).contiguous() if decay_scale is not None else u
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_D = block_d or min(triton.next_power_of_2(Dm), 32)
    grid = (batch, triton.cdiv(Dm, BLOCK_D))
    with _launch_guard(u.device):
        _selective_scan_fwd[grid](
            u, delta, A, Bc, Cc, Dp, zc, y, last, scale, Dm, L, N, dpg_b, dpg_c,
            *u.stride(), *delta.stride(), *zc.stride(), *y.stride(), *sB, *sC,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_SCALE=decay_scale is not None,
            BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
        )
    y = y.to(dtype_in)
    return (y, last) if return_last_state else y


def check_triton(device) -> None:
    """Raise unless the kernel compiles and runs on ``device`` (one 1 x 1 x 1 call)."""
    one = torch.ones(1, 1, 1, device=device)
    selective_scan_triton(one, one, -torch.ones(1, 1, device=device), one, one)


def check(device) -> None:
    """Raise unless this backend runs on ``device``: CUDA, or CPU tensors under ``TRITON_INTERPRET=1``."""
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("on CPU tensors it runs only under TRITON_INTERPRET=1 (slow, for testing)")
        return
    if device.type != "cuda":
        raise RuntimeError(f"it needs a CUDA device, not {device}")
    check_triton(device)




def scan(call: ScanCall) -> ScanOutput:
    """A ``ScanCall`` on the Triton kernel (a reverse call on flipped copies; no first steps)."""
    if call.reverse:
        return reversed_by_flipping(call, scan)
    y, last = selective_scan_triton(call.u, call.delta, call.A, call.B, call.C, call.D, call.z, call.delta_bias,
                                    call.delta_softplus, True, decay_scale=call.decay_scale)
    return ScanOutput(y, last if call.last_state else None)
