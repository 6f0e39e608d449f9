"""Selective scan with mamba-ssm's layout and interchangeable backends; reference twin: ``stm_ref.ssm``.

This module chooses a backend and calls it; the kernels and their facts (one ``Backend`` record each) are
in ``stm_fast.ops.backends``: ``torch`` (any device, chunked inference scan and a differentiable twin),
``fused`` (compiled CPU kernels, built on first use), ``triton`` and ``mamba_ssm`` (CUDA), ``loop`` (the
naive floor). Nothing here names a backend. (STM's compiled weight kernels have their own table,
``stm_fast.ops.weight_kernels``.)

Automatic choice (``backend=None``): the first record of ``BACKENDS`` that the automatic choice tries on
the device, that really works there (probed once, ``ops.probe``) and that takes the call (its dtype,
gradients, ``decay_scale``). A kernel that is installed (or, with nothing to install, expected to work) but
does not work is passed over with one line on stderr saying why. ``STM_SCAN_BACKEND`` (or ``backend=``)
forces a backend; one that cannot run the call is a ``BackendUnavailable`` error naming the reason.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from .ops.backends import BACKENDS, backend as backend_record
from .ops.common import FirstSteps, ScanCall, ScanOutput, check_scan_args
from .ops.probe import probe, say_once
from .runtime import compute_dtype

__all__ = ["selective_scan", "scan_steps", "causal_conv", "available_backends", "backend_status", "resolve_backend",
           "BackendUnavailable", "backends_used", "FirstSteps", "ScanOutput"]


class BackendUnavailable(RuntimeError):
    """The requested scan backend cannot run here (missing or broken kernel, wrong device or dtype)."""


def _check(b, device):
    b.load().check(device)


def _works(b, device) -> tuple[bool, str]:
    """(works, reason) of backend record ``b`` on ``device``, probed once per device (and probe environment)."""
    if not b.runs_on(device):
        return False, f"it needs a {' or '.join(d.upper() for d in b.devices)} device, not {device}"
    env = ",".join(f"{k}={os.environ.get(k, '')}" for k in b.probe_env)
    return probe(f"{b.name}[{env}]" if env else b.name, device, lambda d: _check(b, d))


def _installed(b) -> bool:
    """Whether a failure of ``b`` is worth a line: what it requires is installed (or it requires nothing)."""
    return not b.requires or any(importlib.util.find_spec(m) is not None for m in b.requires)


def backend_status(device="cpu") -> list[tuple[str, bool, str]]:
    """[(name, works, why not)] of every backend on ``device``, in the table's order (the kernels probed)."""
    device = torch.device(device)
    return [(b.name, *_works(b, device)) for b in BACKENDS]


def available_backends(device="cpu") -> list[str]:
    """Backends that can run on ``device`` in this environment, in the table's order (the kernels probed)."""
    device = torch.device(device)
    return [b.name for b in BACKENDS if _works(b, device)[0]]


def _unsuited(b, dtype, needs_grad, decay_scale) -> str | None:
    """Why record ``b`` cannot take this call (None if it can)."""
    if needs_grad and not b.differentiable:
        return "it is forward-only and the inputs need gradients (use a differentiable backend, e.g. torch)"
    if dtype is not None and dtype not in b.dtypes:
        return f"its kernel computes in {'/'.join(str(t).replace('torch.', '') for t in b.dtypes)} only"
    if decay_scale and not b.decay_scale:
        return "its kernel has no decay_scale input"
    return None


def _automatic(device, dtype, needs_grad, decay_scale) -> str:
    tried = [b for b in BACKENDS if "*" in b.automatic_on or device.type in b.automatic_on]
    for i, b in enumerate(tried):
        ok, reason = _works(b, device)
        if not ok and b.runs_on(device) and _installed(b):
            rest = " or ".join(t.name for t in tried[i + 1:]) or "nothing else"
            what = "is installed but not used" if b.requires else "cannot be built here"
            say_once(f"the {b.name} scan kernel {what} on {device} ({reason}); using {rest}")
        if ok and _unsuited(b, dtype, needs_grad, decay_scale) is None:
            return b.name
    raise BackendUnavailable(f"no scan backend takes this call on {device}")


def resolve_backend(backend, device, dtype=None, needs_grad=False, decay_scale=False) -> str:
    """The backend to use for a call on ``device``: the argument, else ``STM_SCAN_BACKEND``, else the best
    available one that takes the call (``dtype``: the compute dtype; ``needs_grad``; a ``decay_scale``)."""
    device = torch.device(device)
    name = backend or os.environ.get("STM_SCAN_BACKEND") or None
    if name is None:
        return _automatic(device, dtype, needs_grad, decay_scale)
    b = backend_record(name)
    ok, reason = _works(b, device)
    if not ok:
        needs = f" (it needs {b.note})" if b.note and b.runs_on(device) else ""
        raise BackendUnavailable(f"scan backend {name!r} cannot run on {device}: {reason}{needs}. Use backend='torch' "
                                 f"(or STM_SCAN_BACKEND=torch) instead")
    why = _unsuited(b, dtype, needs_grad, decay_scale)
    if why:
        raise BackendUnavailable(f"scan backend {name!r} cannot run this call: {why}; use backend='torch'")
    return name


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def scan_steps(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, backend=None,
               decay_scale=None, reverse=False, first_steps=0, return_last_state=False) -> ScanOutput:
    """``selective_scan`` returning a ``ScanOutput``: y, the last state (with ``return_last_state``) and, when
    ``first_steps`` = n > 0 and the backend exports them (and there is no decay_scale), the first n scan
    steps' delta, Abar and B."""
    check_scan_args(u, delta, A)
    ct = compute_dtype(u, delta, A, B, C)
    grad = _needs_grad(u, delta, A, B, C, D, z, delta_bias, decay_scale)
    b = backend_record(resolve_backend(backend, u.device, ct, grad, decay_scale is not None))
    for seen in _RECORDERS:
        seen.add(b.name)
    call = ScanCall(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                    delta_softplus=bool(delta_softplus), decay_scale=decay_scale, reverse=bool(reverse),
                    first_steps=int(first_steps) if b.first_steps and decay_scale is None else 0,
                    last_state=bool(return_last_state), grad=grad, dtype=ct)
    return b.load().scan(call)


_RECORDERS: list[set] = []  # open ``backends_used`` blocks


@contextlib.contextmanager
def backends_used():
    """Within the block, the names of the scan backends that actually ran are collected in the set it yields
    (what a run records: the automatic choice can differ by call, e.g. for a ``decay_scale``)."""
    seen: set = set()
    _RECORDERS.append(seen)
    try:
        yield seen
    finally:
        _RECORDERS.remove(seen)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                   delta_softplus: bool = False, return_last_state: bool = False, backend: str | None = None,
                   decay_scale: torch.Tensor | None = None, reverse: bool = False):
    """Selective scan with mamba-ssm's layout and semantics (twin of ``stm_ref.ssm.selective_scan``).

    ``u, delta, z``: (batch, D, L); ``A``: (D, N); ``B, C``: (batch, N, L), (batch, G, N, L) or (D, N);
    ``D, delta_bias``: (D,). delta <- softplus(delta + delta_bias) when asked; Abar = exp(delta*A),
    Bbar = delta*B (Euler, as Mamba's kernels; eq. 2-3); y = (C·h + D*u) * silu(z). Computes in float32
    (float64 if any input is float64) and returns y in u's dtype, plus the last state if asked.
    ``decay_scale`` (batch, L): Abar = exp(scale * delta * A), Bbar unchanged (pruned-sequence alignment,
    docs/conventions.md §1). ``reverse``: scan t = L-1 .. 0 (y still indexed by t).
    """
    out = scan_steps(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend, decay_scale, reverse,
                     return_last_state=return_last_state)
    return (out.y, out.last) if return_last_state else out.y


def causal_conv(x, weight, bias, reverse=False, backend=None, dtype=None):
    """Mamba's causal depthwise conv + SiLU of (batch, E, L) ``x`` as the backend that runs the scan does it
    (``reverse``: the conv of the time-reversed sequence, indexed by t); the backend is resolved as for a
    scan of ``dtype`` (default: x's compute dtype)."""
    grad = _needs_grad(x, weight, bias)
    name = resolve_backend(backend, x.device, dtype or compute_dtype(x), grad)
    return backend_record(name).load().conv(x, weight, bias, reverse)
