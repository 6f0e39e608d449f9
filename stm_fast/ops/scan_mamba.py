"""The ``mamba_ssm`` selective-scan backend: mamba-ssm's CUDA forward kernel, called directly (inference).

Reference twin: ``stm_ref.ssm.selective_scan``. This calls the compiled module ``selective_scan_cuda``
that ``pip install mamba-ssm`` builds, as mamba-ssm's own ``SelectiveScanFn.forward`` does, without
importing the ``mamba_ssm`` package (whose ``__init__`` pulls in transformers and its model classes,
and which may be installed without the kernel). Inputs that need gradients go to the torch backend.

The C++ entry accepts u, delta, z in float32/float16/bfloat16 (all one dtype), A in float32, B and C in
u's dtype when per step ((batch, N, L) or (batch, G, N, L)) and float32 when (D, N), D and delta_bias in
float32, and the last axis of u, delta, z, B, C contiguous; ``mamba_dtypes`` casts to exactly that, and
float64 is refused (``stm_fast.ssm`` never chooses this backend for it).
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from .conv import conv  # noqa: F401  (this backend's conv: the torch one)
from .common import ScanCall, ScanOutput, reversed_by_flipping

__all__ = ["selective_scan_mamba", "mamba_dtypes", "check_mamba", "KERNEL_DTYPES", "scan", "check", "conv"]

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernel():
    return importlib.import_module("selective_scan_cuda")


def check_mamba(device: torch.device) -> None:
    """Raise unless mamba-ssm's compiled kernel imports and runs on ``device`` (one 1 x 1 x 1 call)."""
    if device.type != "cuda":
        raise RuntimeError(f"it needs a CUDA device, not {device}")
    if not hasattr(_kernel(), "fwd"):
        raise ImportError("selective_scan_cuda has no fwd: not mamba-ssm's selective scan extension")
    one = torch.ones(1, 1, 1, device=device)
    selective_scan_mamba(one, one, -torch.ones(1, 1, device=device), torch.ones(1, 1, 1, device=device),
                         torch.ones(1, 1, 1, device=device))


def mamba_dtypes(u, delta, A, B, C, D, z, delta_bias):
    """The arguments cast to the dtypes the C++ entry accepts (see the module docstring)."""
    if u.dtype == torch.float64 or any(t is not None and t.dtype == torch.float64 for t in (delta, A, B, C, D, z)):
        raise ValueError("mamba-ssm's kernel computes in float32/float16/bfloat16 only; use the torch backend for float64")
    it = u.dtype if u.dtype in KERNEL_DTYPES else torch.float32
    f32 = lambda t: None if t is None else t.to(torch.float32)  # noqa: E731
    bc = lambda t: t.to(torch.float32) if t.dim() == 2 else t.to(it)  # noqa: E731
    return u.to(it), delta.to(it), f32(A), bc(B), bc(C), f32(D), None if z is None else z.to(it), f32(delta_bias)


def _last_axis_contiguous(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def selective_scan_mamba(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """Same contract as ``stm_fast.ssm.selective_scan`` (no ``decay_scale``, no first-steps export); y in
    u's dtype, the last state in float32."""
    dtype_in = u.dtype
    u, delta, A, B, C, D, z, delta_bias = mamba_dtypes(u, delta, A, B, C, D, z, delta_bias)
    u, delta, B, C, z = (_last_axis_contiguous(t) for t in (u, delta, B, C, z))
    B = B.unsqueeze(1) if B.dim() == 3 else B
    C = C.unsqueeze(1) if C.dim() == 3 else C
    out, x, *rest = _kernel().fwd(u, delta, A, B, C, None if D is None else D.contiguous(), z, delta_bias,
                                  delta_softplus)
    y = (rest[0] if z is not None else out).to(dtype_in)
    return (y, x[:, :, -1, 1::2]) if return_last_state else y


check = check_mamba




def scan(call: ScanCall) -> ScanOutput:
    """A ``ScanCall`` on mamba-ssm's kernel (a reverse call on flipped copies; no first steps)."""
    if call.reverse:
        return reversed_by_flipping(call, scan)
    y, last = selective_scan_mamba(call.u, call.delta, call.A, call.B, call.C, call.D, call.z, call.delta_bias,
                                   call.delta_softplus, True)
    return ScanOutput(y, last)
