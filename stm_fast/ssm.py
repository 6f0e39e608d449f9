"""Selective scan with mamba-ssm's layout and interchangeable backends; reference twin: ``stm_ref.ssm``.

This module only chooses and calls a backend; the kernels live in ``stm_fast.ops``:

* ``torch`` (``ops.scan_torch``, any device): chunked, states-first inference scan with reused buffers;
  inputs that need gradients go through its differentiable twin ``ops.scan_autograd``.
* ``fused`` (``ops.scan_fused``, CPU, inference): a C++ kernel compiled on first use through torch's
  extension tooling, one pass over time with the state in registers/L1 (float32 and float64).
* ``triton`` (``ops.scan_triton``): a Triton kernel (CUDA, inference); runs on CPU tensors under
  ``TRITON_INTERPRET=1``.
* ``mamba_ssm`` (``ops.scan_mamba``): mamba-ssm's compiled CUDA forward (float32/16/bf16, inference).
* ``loop`` (``ops.scan_loop``): one Python iteration per time step, the naive floor the benchmarks compare
  against (never chosen automatically).

Automatic choice (``backend=None``): on CUDA ``mamba_ssm`` when its kernel really works there (probed
once, ``ops.probe``) and the call suits it (no float64, no ``decay_scale``, no gradients), else
``triton`` when it works and no gradient is needed, else ``torch``; on the CPU ``fused`` when it builds
and no gradient is needed, else ``torch``; on other devices ``torch``. A kernel that is installed (for
``fused``: expected to build) but does not work is passed over with one line on stderr saying why. The environment
variable ``STM_SCAN_BACKEND`` (or ``backend=``) forces a backend; one that cannot run the call is a
``BackendUnavailable`` error naming the reason.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from .ops.common import FirstSteps, check_scan_args
from .ops.probe import probe, say_once
from .ops.scan_autograd import scan_differentiable
from .ops.scan_loop import scan_loop
from .ops.scan_torch import scan_inference
from .runtime import compute_dtype

__all__ = ["selective_scan", "available_backends", "resolve_backend", "BACKENDS", "BackendUnavailable",
           "exports_first_steps"]

BACKENDS = ("torch", "fused", "triton", "mamba_ssm", "loop")


class BackendUnavailable(RuntimeError):
    """The requested scan backend cannot run here (missing or broken kernel, wrong device or dtype)."""


def _check_triton(device):
    if importlib.util.find_spec("triton") is None:
        raise ImportError("triton is not installed")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("on CPU tensors it runs only under TRITON_INTERPRET=1 (slow, for testing)")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"it needs a CUDA device, not {device}")
    if device.type == "cuda":
        from .ops.scan_triton import check_triton

        check_triton(device)


def _check_mamba(device):
    from .ops.scan_mamba import check_mamba

    check_mamba(device)


def _check_fused(device):
    from .ops.scan_fused import available

    ok, reason = available()
    if not ok:
        raise RuntimeError(reason)


def _works(name, device):
    """(works, reason) of a backend on ``device``, probed once."""
    if name in ("torch", "loop"):
        return True, ""
    if name == "fused" and device.type != "cpu":
        return False, f"it is a CPU kernel, not for {device}"
    if name == "triton" and device.type == "cpu":  # the interpreter: decided by the environment, not cached
        try:
            _check_triton(device)
            return True, ""
        except (ImportError, RuntimeError) as e:
            return False, str(e)
    check = {"triton": _check_triton, "mamba_ssm": _check_mamba, "fused": _check_fused}[name]
    return probe(name, device, check)


def _installed(name):
    if name == "fused":  # built here from source shipped with the package: always expected to work
        return True
    module = {"triton": "triton", "mamba_ssm": "selective_scan_cuda"}.get(name)
    return module is not None and (importlib.util.find_spec(module) is not None
                                   or (name == "mamba_ssm" and importlib.util.find_spec("mamba_ssm") is not None))


def available_backends(device="cpu") -> list[str]:
    """Backends that can run on ``device`` in this environment (the optional kernels probed)."""
    device = torch.device(device)
    return [b for b in ("mamba_ssm", "triton", "fused", "torch", "loop") if _works(b, device)[0]]


def _unsuited(name, dtype, needs_grad, decay_scale):
    """Why backend ``name`` cannot take this call (None if it can)."""
    if needs_grad and name in ("triton", "mamba_ssm"):
        return "it is forward-only and the inputs need gradients (the torch and fused backends are differentiable)"
    if name == "mamba_ssm" and dtype == torch.float64:
        return "mamba-ssm's kernel computes in float32/float16/bfloat16 only"
    if name == "mamba_ssm" and decay_scale:
        return "mamba-ssm's kernel has no decay_scale input"
    return None


def _candidates(device):
    """The optional kernels the automatic choice tries on ``device``, best first."""
    return {"cuda": ("mamba_ssm", "triton"), "cpu": ("fused",)}.get(device.type, ())


def _automatic(device, dtype, needs_grad, decay_scale):
    names = _candidates(device)
    for i, name in enumerate(names):
        ok, reason = _works(name, device)
        if not ok and _installed(name):
            what = "cannot be built here" if name == "fused" else "is installed but not used"
            fallback = " or ".join(names[i + 1:] + ("torch",))
            say_once(f"the {name} scan kernel {what} on {device} ({reason}); using {fallback}")
        if ok and _unsuited(name, dtype, needs_grad, decay_scale) is None:
            return name
    return "torch"


def resolve_backend(backend, device, dtype=None, needs_grad=False, decay_scale=False) -> str:
    """The backend to use for a call on ``device``: the argument, else ``STM_SCAN_BACKEND``, else the best
    available one that suits the call (``dtype``: the compute dtype; ``needs_grad``; a ``decay_scale``)."""
    device = torch.device(device)
    name = backend or os.environ.get("STM_SCAN_BACKEND") or None
    if name is None:
        return _automatic(device, dtype, needs_grad, decay_scale)
    if name not in BACKENDS:
        raise ValueError(f"unknown scan backend {name!r}; choose one of {BACKENDS}")
    ok, reason = _works(name, device)
    if not ok:
        raise BackendUnavailable(f"scan backend {name!r} cannot run on {device}: {reason}. Use backend='torch' "
                                 f"(or STM_SCAN_BACKEND=torch) instead" + (" (CUDA and `pip install .[cuda]` for "
                                                                          "mamba_ssm)" if name == "mamba_ssm" else ""))
    why = _unsuited(name, dtype, needs_grad, decay_scale)
    if why:
        raise BackendUnavailable(f"scan backend {name!r} cannot run this call: {why}; use backend='torch'")
    return name


def exports_first_steps(backend, device, needs_grad=False) -> bool:
    """Whether a call would fill a ``FirstSteps`` request (the torch and fused inference paths do): callers
    skip allocating the export buffers otherwise."""
    return not needs_grad and resolve_backend(backend, device, needs_grad=needs_grad) in ("torch", "fused")


def _unfused(name, u, delta, A, B, C, D, z, delta_bias, delta_softplus, decay_scale, reverse=False):
    """The differentiable and the loop paths: bias and softplus before, the D*u skip and the z gate after
    (``reverse`` only for the fused training kernel, which scans backward by index arithmetic)."""
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if name == "fused":
        from .ops.scan_fused import scan_differentiable_fused

        y, last = scan_differentiable_fused(u, delta, A, B, C, decay_scale=decay_scale, reverse=reverse)
    else:
        scan = scan_loop if name == "loop" else scan_differentiable
        y, last = scan(u, delta, A, B, C, decay_scale=decay_scale)
    if D is not None:
        y = y + D[None, :, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y, last


def _flipped(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend, decay_scale, first):
    """A reverse scan as the forward scan of the time-flipped inputs, its output flipped back."""
    flip = lambda t: None if t is None or (t.dim() == 2 and t is not decay_scale) else t.flip(-1)  # noqa: E731
    out = selective_scan(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), delta_bias, delta_softplus,
                         return_last_state, backend, flip(decay_scale), first)
    return (out[0].flip(-1), out[1]) if return_last_state else out.flip(-1)


def _fused(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, decay_scale, first, ct,
           reverse=False):
    """The fused CPU kernel, with a ``FirstSteps`` request turned into its (delta, Abar, B) buffers."""
    from .ops.scan_fused import selective_scan_fused

    outs = None
    if first is not None and first.n and decay_scale is None:
        batch, Dm, L = u.shape
        N, n = A.shape[1], min(first.n, L)
        new = lambda shape: u.new_empty(shape, dtype=ct)  # noqa: E731
        first.delta = new((n, batch, Dm)) if first.delta is None else first.delta
        first.Abar = new((n, batch, N, Dm)) if first.Abar is None else first.Abar
        if B.dim() != 3:  # B is exported only for the (batch, N, L) layout, as on the torch path
            first.B = None
        elif first.B is None:
            first.B = new((n, batch, N))
        outs = (first.delta, first.Abar, first.B)
    result = selective_scan_fused(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  decay_scale=decay_scale, first_steps=outs, reverse=reverse)
    if outs is not None:
        first.filled = True
    return result


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                   delta_softplus: bool = False, return_last_state: bool = False, backend: str | None = None,
                   decay_scale: torch.Tensor | None = None, first_steps: FirstSteps | None = None,
                   reverse: bool = False):
    """Selective scan with mamba-ssm's layout and semantics (twin of ``stm_ref.ssm.selective_scan``).

    ``u, delta, z``: (batch, D, L); ``A``: (D, N); ``B, C``: (batch, N, L), (batch, G, N, L) or (D, N);
    ``D, delta_bias``: (D,). delta <- softplus(delta + delta_bias) when asked; Abar = exp(delta*A),
    Bbar = delta*B (Euler, as Mamba's kernels; eq. 2-3); y = (C·h + D*u) * silu(z). Computes in float32
    (float64 if any input is float64) and returns y in u's dtype, plus the last state if asked.
    ``decay_scale`` (batch, L): Abar = exp(scale * delta * A), Bbar unchanged (pruned-sequence alignment,
    docs/conventions.md §1). ``first_steps``: a ``FirstSteps`` request the ``fused`` and ``torch`` inference
    paths fill when there is no decay_scale (torch: when its n fits one chunk); others leave it untouched.
    ``reverse``: scan t = L-1 .. 0 (first steps in that order; y still indexed by t): the fused kernel by
    index arithmetic, the other backends on time-flipped copies.
    """
    check_scan_args(u, delta, A)
    ct = compute_dtype(u, delta, A, B, C)
    grad = _needs_grad(u, delta, A, B, C, D, z, delta_bias, decay_scale)
    name = resolve_backend(backend, u.device, ct, grad, decay_scale is not None)
    if reverse and name != "fused":
        return _flipped(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend,
                        decay_scale, first_steps)
    if name == "mamba_ssm":
        from .ops.scan_mamba import selective_scan_mamba

        return selective_scan_mamba(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "fused" and grad and B.dim() == 3 and C.dim() == 3:
        y, last = _unfused(name, u, delta, A, B, C, D, z, delta_bias, delta_softplus, decay_scale, reverse)
        y = y.to(u.dtype)
        return (y, last) if return_last_state else y
    if name == "fused":
        return _fused(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, decay_scale,
                      first_steps, ct, reverse)
    if name == "triton":
        from .ops.scan_triton import selective_scan_triton

        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                     decay_scale=decay_scale)
    cast = lambda t: None if t is None else t.to(ct)  # noqa: E731
    args = [cast(t) for t in (u, delta, A, B, C, D, z, delta_bias)]
    if name == "torch" and not grad:
        uc, dc, Ac, Bc, Cc, Dc, zc, bias = args
        y, last = scan_inference(uc, dc, Ac, Bc, Cc, decay_scale=cast(decay_scale), delta_bias=bias,
                                 delta_softplus=delta_softplus, D=Dc, z=zc, first_steps=first_steps)
    else:
        y, last = _unfused(name, *args, delta_softplus, cast(decay_scale))
    y = y.to(u.dtype)
    return (y, last) if return_last_state else y
