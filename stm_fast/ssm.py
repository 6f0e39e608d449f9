"""Selective scan with mamba-ssm's layout and interchangeable backends; reference twin: ``stm_ref.ssm``.

This module only chooses and calls a backend; the kernels live in ``stm_fast.ops``:

* ``torch`` (``ops.scan_torch``, any device): chunked, states-first inference scan with reused buffers;
  inputs that need gradients go through its differentiable twin ``ops.scan_autograd``.
* ``triton`` (``ops.scan_triton``): a Triton kernel (CUDA, inference); runs on CPU tensors under
  ``TRITON_INTERPRET=1``.
* ``mamba_ssm``: mamba-ssm's CUDA ``selective_scan_fn`` when installed.
* ``loop`` (``ops.scan_loop``): one Python iteration per time step, the naive floor the benchmarks compare
  against (never chosen automatically).

``backend=None`` picks ``mamba_ssm`` on CUDA when installed, else ``triton`` on CUDA when importable,
else ``torch``. The environment variable ``STM_SCAN_BACKEND`` overrides the automatic choice.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from .ops.common import FirstSteps, check_scan_args
from .ops.scan_autograd import scan_differentiable
from .ops.scan_loop import scan_loop
from .ops.scan_torch import scan_inference
from .runtime import compute_dtype

__all__ = ["selective_scan", "available_backends", "resolve_backend", "BACKENDS", "BackendUnavailable"]

BACKENDS = ("torch", "triton", "mamba_ssm", "loop")


class BackendUnavailable(RuntimeError):
    """The requested scan backend cannot run here (missing package or wrong device)."""


def _triton_runs_on(device):
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _mamba_ssm_runs_on(device):
    return device.type == "cuda" and importlib.util.find_spec("mamba_ssm") is not None


def available_backends(device="cpu") -> list[str]:
    """Backends that can run on ``device`` in this environment."""
    device = torch.device(device)
    out = ["torch", "loop"]
    if _triton_runs_on(device):
        out.insert(1, "triton")
    if _mamba_ssm_runs_on(device):
        out.insert(0, "mamba_ssm")
    return out


def resolve_backend(backend, device) -> str:
    """The backend to use: the argument, else ``STM_SCAN_BACKEND``, else the best available on ``device``."""
    device = torch.device(device)
    name = backend or os.environ.get("STM_SCAN_BACKEND") or None
    if name is None:
        if _mamba_ssm_runs_on(device):
            return "mamba_ssm"
        if device.type == "cuda" and _triton_runs_on(device):
            return "triton"
        return "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown scan backend {name!r}; choose one of {BACKENDS}")
    if name == "triton" and not _triton_runs_on(device):
        raise BackendUnavailable(
            f"scan backend 'triton' cannot run on {device}: it needs a CUDA device with triton installed "
            f"(or TRITON_INTERPRET=1 for CPU tensors, slow, for testing). Use backend='torch' instead.")
    if name == "mamba_ssm" and not _mamba_ssm_runs_on(device):
        raise BackendUnavailable(
            f"scan backend 'mamba_ssm' cannot run on {device}: it needs CUDA and `pip install .[cuda]`. "
            f"Use backend='torch' instead.")
    return name


def _unfused(name, u, delta, A, B, C, D, z, delta_bias, delta_softplus, decay_scale):
    """The differentiable and the loop paths: bias and softplus before, the D*u skip and the z gate after."""
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    scan = scan_loop if name == "loop" else scan_differentiable
    y, last = scan(u, delta, A, B, C, decay_scale=decay_scale)
    if D is not None:
        y = y + D[None, :, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y, last


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                   delta_softplus: bool = False, return_last_state: bool = False, backend: str | None = None,
                   decay_scale: torch.Tensor | None = None, first_steps: FirstSteps | None = None):
    """Selective scan with mamba-ssm's layout and semantics (twin of ``stm_ref.ssm.selective_scan``).

    ``u, delta, z``: (batch, D, L); ``A``: (D, N); ``B, C``: (batch, N, L), (batch, G, N, L) or (D, N);
    ``D, delta_bias``: (D,). delta <- softplus(delta + delta_bias) when asked; Abar = exp(delta*A),
    Bbar = delta*B (Euler, as Mamba's kernels; eq. 2-3); y = (C·h + D*u) * silu(z). Computes in float32
    (float64 if any input is float64) and returns y in u's dtype, plus the last state if asked.
    ``decay_scale`` (batch, L): Abar = exp(scale * delta * A), Bbar unchanged (pruned-sequence alignment,
    docs/conventions.md §1); mamba-ssm's kernel has no such input, so the automatic choice skips it then.
    ``first_steps``: a ``FirstSteps`` request the ``torch`` inference path fills (when its n fits one chunk
    and there is no decay_scale); other backends leave it untouched.
    """
    check_scan_args(u, delta, A)
    if decay_scale is not None and backend is None and os.environ.get("STM_SCAN_BACKEND") in (None, "", "mamba_ssm"):
        backend = "triton" if u.is_cuda and _triton_runs_on(u.device) else "torch"
    name = resolve_backend(backend, u.device)
    if name == "mamba_ssm" and decay_scale is not None:
        raise BackendUnavailable("scan backend 'mamba_ssm' has no decay_scale input; use 'triton' or 'torch'")
    if name == "mamba_ssm":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "triton":
        from .ops.scan_triton import selective_scan_triton

        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                     decay_scale=decay_scale)
    ct = compute_dtype(u, delta, A, B, C)
    cast = lambda t: None if t is None else t.to(ct)  # noqa: E731
    args = [cast(t) for t in (u, delta, A, B, C, D, z, delta_bias)]
    if name == "torch" and not _needs_grad(u, delta, A, B, C, D, z, delta_bias, decay_scale):
        uc, dc, Ac, Bc, Cc, Dc, zc, bias = args
        y, last = scan_inference(uc, dc, Ac, Bc, Cc, decay_scale=cast(decay_scale), delta_bias=bias,
                                 delta_softplus=delta_softplus, D=Dc, z=zc, first_steps=first_steps)
    else:
        y, last = _unfused(name, *args, delta_softplus, cast(decay_scale))
    y = y.to(u.dtype)
    return (y, last) if return_last_state else y
