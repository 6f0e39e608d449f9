"""The ``triton`` selective-scan backend (CUDA, inference); reference twin: ``stm_ref.ssm.selective_scan``.

One program per (batch item, block of channels) walks the sequence, keeping the (BLOCK_D, N) state
in registers: delta <- softplus(delta + delta_bias) (each when asked), Abar = exp2(delta * A * log2 e),
h = Abar*h + delta*u*B, y = (C·h + D*u) * silu(z). One pass over the inputs, nothing written but y (and
the last state when asked):

* every input is read in its own dtype and memory layout and converted to the compute dtype in registers
  (float32, or float64 when u, delta, A, B or C is float64, as ``stm_fast.runtime.compute_dtype``); y is
  written in u's dtype, so bf16/fp16 inputs cost no host-side casting copies;
* the delta bias and softplus are applied in the kernel, softplus as torch's (beta 1, threshold 20, which
  mamba-ssm's kernel copies): x where x > 20, else log1p(exp(x)), with log1p(e) as Kahan's
  log(w)·e/(w-1), w = 1+e (Triton's interpreter has no libdevice; accurate to a few ulp in either dtype);
* ``reverse`` scans t = L-1 .. 0 by index arithmetic (y is still stored at t): no flipped copies;
* B and C are read through four strides (batch, group, state, time) and a group size, so the (batch, N, L),
  (D, N) and grouped layouts need no copies (a stride of 0 broadcasts); u, delta, z, y, A, D, the bias
  and decay_scale each have their own strides, so the channel-last rows Vim's mixer makes are read as
  they are (contiguous over channels).

Program ids are 64-bit, so offsets do not overflow for batch * D * L >= 2^31. The block of channels per
program is chosen from the grid (``block_d_for``) so that small batches still fill the GPU. Runs on CUDA;
on CPU tensors only under ``TRITON_INTERPRET=1`` (set before this module is imported), which the tests use.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from ..runtime import compute_dtype
from .conv import conv  # noqa: F401  (this backend's conv: the torch one)
from .common import ScanCall, ScanOutput, bc_layout, channel_last

__all__ = ["selective_scan_triton", "check_triton", "block_d_for", "scan", "check", "conv"]

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _softplus(x):
    """torch's softplus (beta 1, threshold 20): x where x > 20, else log1p(exp(x)); log1p(e) = log(w) * e / (w - 1)
    with w = 1 + e (Kahan), exact to a few ulp where log(w) alone would lose every digit (e << 1)."""
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    return tl.where(x > 20.0, x, tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0))))


@triton.jit
def _rounded(y, OUT: tl.constexpr):
    """y in the output dtype; bf16/fp16 through float32, as torch's ``.to()`` rounds a float64."""
    if OUT.primitive_bitwidth < 32:
        y = y.to(tl.float32)
    return y.to(OUT)


@triton.jit
def _selective_scan_fwd(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, scale_ptr, y_ptr, last_ptr,
    Dm, L, N, DPG_B, DPG_C,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_yb, s_yd, s_yl,
    s_Ad, s_An, s_D, s_bias, s_sb, s_sl,
    s_Bb, s_Bg, s_Bn, s_Bl,
    s_Cb, s_Cg, s_Cn, s_Cl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_SCALE: tl.constexpr, REVERSE: tl.constexpr, STORE_LAST: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # 64-bit program ids: batch * D * L can pass 2^31 (Vim-B at 730 tokens from batch ~1,800), and
    # i32 products of ids and strides would wrap silently
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < Dm
    mask_dn = mask_d[:, None] & (offs_n < N)[None, :]
    # every load is converted to the compute dtype ACC in registers (the scalar constants take ACC too)
    A2 = tl.load(A_ptr + offs_d[:, None] * s_Ad + offs_n[None, :] * s_An, mask=mask_dn, other=0.0).to(ACC)
    A2 = A2 * 1.4426950408889634  # LOG2E: Abar = exp2(delta * A * log2 e)
    if HAS_D:
        Dp = tl.load(D_ptr + offs_d * s_D, mask=mask_d, other=0.0).to(ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d * s_bias, mask=mask_d, other=0.0).to(ACC)
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)
    u_base = u_ptr + pid_b * s_ub + offs_d * s_ud
    d_base = delta_ptr + pid_b * s_db + offs_d * s_dd
    z_base = z_ptr + pid_b * s_zb + offs_d * s_zd
    y_base = y_ptr + pid_b * s_yb + offs_d * s_yd
    sc_base = scale_ptr + pid_b * s_sb
    # channel d reads B/C group d // (D / G): grouped layouts are indexed, not copied
    B_base = B_ptr + pid_b * s_Bb + (offs_d // DPG_B)[:, None] * s_Bg + offs_n[None, :] * s_Bn
    C_base = C_ptr + pid_b * s_Cb + (offs_d // DPG_C)[:, None] * s_Cg + offs_n[None, :] * s_Cn
    for i in range(0, L):
        t = L - 1 - i if REVERSE else i  # reverse: scan t = L-1 .. 0; every read and the store of y are at t
        u = tl.load(u_base + t * s_ul, mask=mask_d, other=0.0).to(ACC)
        dt = tl.load(d_base + t * s_dl, mask=mask_d, other=0.0).to(ACC)
        if HAS_BIAS:
            dt = dt + bias
        if SOFTPLUS:
            dt = _softplus(dt)
        Bt = tl.load(B_base + t * s_Bl, mask=mask_dn, other=0.0).to(ACC)
        Ct = tl.load(C_base + t * s_Cl, mask=mask_dn, other=0.0).to(ACC)
        if HAS_SCALE:
            sc = tl.load(sc_base + t * s_sl).to(ACC)
            dA = tl.exp2((dt * sc)[:, None] * A2)
        else:
            dA = tl.exp2(dt[:, None] * A2)
        h = dA * h + (dt * u)[:, None] * Bt
        y = tl.sum(h * Ct, axis=1)
        if HAS_D:
            y = y + Dp * u
        if HAS_Z:
            zt = tl.load(z_base + t * s_zl, mask=mask_d, other=0.0).to(ACC)
            y = y * (zt / (1.0 + tl.exp(-zt)))
        tl.store(y_base + t * s_yl, _rounded(y, y_ptr.dtype.element_ty), mask=mask_d)
    if STORE_LAST:
        tl.store(last_ptr + pid_b * Dm * N + offs_d[:, None] * N + offs_n[None, :], h, mask=mask_dn)


def block_d_for(batch: int, channels: int, sm_count: int | None, largest: int = 32, smallest: int = 4) -> int:
    """Channels per program (a power of two): the largest block, from ``min(next_pow2(channels), largest)``
    down to ``smallest``, whose grid of ``batch * ceil(channels / block)`` programs is at least twice
    ``sm_count`` (every SM busy, with slack for uneven finishing); ``smallest`` when none is (a program's
    state should keep a few warps busy). ``sm_count=None`` (the interpreter, no GPU to fill) gives
    the largest block: the interpreter runs programs one after another, so fewer, wider ones are faster.

    At Vim-Ti's 384 channels on an H100 (132 SMs): batch 1-5 -> 4 channels per program (96-480 programs),
    6-10 -> 8 (batch 8: 384 programs where a fixed 32 gave 96), 11-21 -> 16, 22 and up -> 32. Warps per
    program follow the block (``_num_warps``)."""
    block = min(triton.next_power_of_2(max(channels, 1)), largest)
    if sm_count is None:
        return block
    while block > smallest and batch * triton.cdiv(channels, block) < 2 * sm_count:
        block //= 2
    return block


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (queried once per device)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_warps(block_d: int, block_n: int) -> int:
    """Warps per program: one state element per thread where the block is small (at most 4 warps)."""
    return max(1, min(4, block_d * block_n // 32))


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
                          return_last_state=False, block_d=None, decay_scale=None, reverse=False):
    """Same contract as ``stm_fast.ssm.selective_scan``; computes in float32 (float64 if u, delta, A, B or C
    is), reading each input in its own dtype and layout (no host-side copies) and returning y in u's dtype.
    ``block_d``: channels per program (default ``block_d_for``). Inference only: the output has no gradient
    (``stm_fast.ssm`` never picks this backend when one is needed)."""
    batch, Dm, L = u.shape
    N = A.shape[1]
    _same_device(u.device, delta, A, B, C, D, z, delta_bias, decay_scale)
    ct = compute_dtype(u, delta, A, B, C)
    dpg_b, sB = _strides_BC(B, batch, Dm, N, L, "B")
    dpg_c, sC = _strides_BC(C, batch, Dm, N, L, "C")
    y = _output_like(u, u.dtype)
    # absent inputs and outputs: a read-only placeholder pointer and zero strides (the kernel never touches them)
    last = torch.empty(batch, Dm, N, dtype=ct, device=u.device) if return_last_state else A
    Dp = D if D is not None else A
    zc = z if z is not None else u
    bias = delta_bias if delta_bias is not None else A
    scale = decay_scale if decay_scale is not None else A
    s_z = zc.stride() if z is not None else (0, 0, 0)
    s_D = D.stride(0) if D is not None else 0
    s_bias = delta_bias.stride(0) if delta_bias is not None else 0
    s_scale = decay_scale.stride() if decay_scale is not None else (0, 0)
    BLOCK_N = triton.next_power_of_2(N)
    sm = _sm_count(u.device.index if u.device.index is not None else torch.cuda.current_device()) \
        if u.device.type == "cuda" else None
    BLOCK_D = block_d or block_d_for(batch, Dm, sm)
    grid = (batch, triton.cdiv(Dm, BLOCK_D))
    with _launch_guard(u.device):
        _selective_scan_fwd[grid](
            u, delta, A, B, C, Dp, zc, bias, scale, y, last, Dm, L, N, dpg_b, dpg_c,
            *u.stride(), *delta.stride(), *s_z, *y.stride(), *A.stride(), s_D, s_bias, *s_scale, *sB, *sC,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus), HAS_SCALE=decay_scale is not None, REVERSE=bool(reverse),
            STORE_LAST=bool(return_last_state), ACC=_TL_DTYPE[ct], BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
            num_warps=_num_warps(BLOCK_D, BLOCK_N),
        )
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
    """A ``ScanCall`` on the Triton kernel (a reverse call by index arithmetic; no first steps)."""
    out = selective_scan_triton(call.u, call.delta, call.A, call.B, call.C, call.D, call.z, call.delta_bias,
                                call.delta_softplus, call.last_state, decay_scale=call.decay_scale,
                                reverse=call.reverse)
    y, last = out if call.last_state else (out, None)
    return ScanOutput(y, last)
