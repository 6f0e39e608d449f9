"""Every run checks itself first: the scan backend and device a run will use, in float32, against a float64
copy through the torch backend on the CPU, on a small batch, for the unreduced model and one STM reduction:
the logits and every layer's mixer output, each relative to its own scale. The allowance of each output is
``TOLERANCE`` plus ``SLACK`` times the float32 torch backend's own error on that output (a same-precision
reference's error: float32 round-off grows through the layers of a deep model).

``python -m stm_fast.eval`` and ``python -m stm_fast.bench`` call ``self_check`` before any work; beyond the
allowance they stop with one line naming the backend, the device, the error and how to choose another
backend; within it the result is recorded (``self_check`` in ``run.json``, in every results record and in
the bench's rows) and printed in one line. ``--no-self-check`` skips it.
"""

from __future__ import annotations

import copy

import torch

from .reduction import make_reduction, reduced
from .ssm import resolve_backend

__all__ = ["self_check", "SelfCheckFailed", "TOLERANCE", "describe_check"]

TOLERANCE = 1e-4  # float32 kernels that agree differ by ~1e-6 of the logit scale; a broken one by far more
SLACK = 4.0  # a correct float32 kernel's error is about the torch backend's (0.9x-1.1x on Vim-Ti)


class SelfCheckFailed(RuntimeError):
    """The backend a run would use is further from the float64 torch copy than its allowance: its numbers
    would be wrong."""


def _outputs(model, x, reduction):
    """Logits and every layer's mixer output (a freshly initialised model's layers move its logits little,
    so the mixer outputs are what shows a wrong scan)."""
    seen = []
    hooks = [layer.mixer.register_forward_hook(lambda mod, args, out: seen.append(out[0].double().cpu()))
             for layer in model.layers]
    try:
        with torch.inference_mode(), reduced(model, reduction):
            logits = model(x).double().cpu()
    finally:
        for h in hooks:
            h.remove()
    return [logits, *seen]


def _relative(got, want):
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def _reductions(model):
    """The unreduced model and one STM reduction (continuous weights: no near-tie can flip a choice)."""
    try:
        return [make_reduction(model, "none"), make_reduction(model, "stm", rate=0.2)]
    except ValueError:  # a model too small for 20%
        return [make_reduction(model, "none")]


def _away_from_init(model, seed=0):
    """A copy whose parameters are moved well away from their initialisation: at init the scan's state term
    is negligible beside the D*u skip, so a wrong scan would not show in a randomly initialised model."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g).to(p))
    return model


def _reference(model, x, reductions):
    """The float64 outputs (CPU, torch backend) for each reduction, concatenated."""
    ref = copy.deepcopy(model).double().cpu().set_scan_backend("torch")
    return [out for reduction in reductions for out in _outputs(ref, x.double().cpu(), reduction)]


def _errors(model, x, device, reductions, want, backend=None):
    """Relative errors, output by output, of a float32 copy of ``model`` on ``device`` (``backend``, or its own
    choice) against the float64 outputs ``want``."""
    checked = copy.deepcopy(model).to(dtype=torch.float32, device=device)
    if backend:
        checked.set_scan_backend(backend)
    got = [out for reduction in reductions for out in _outputs(checked, x.float().to(device), reduction)]
    return [_relative(g, w) for g, w in zip(got, want)]


def self_check(model, x, device, random_weights=False) -> dict:
    """Compare ``model`` on ``device`` (its own scan backend choice, float32) with a float64 copy on the CPU
    through the torch backend, on the images ``x``, output by output; the allowance of each output is
    TOLERANCE plus SLACK times the float32 torch backend's own error there (float32 round-off grows through
    24 layers). ``random_weights``: the model is freshly initialised (the bench), so the check runs on a copy
    moved away from its initialisation. Returns the record; raises SelfCheckFailed beyond the allowance."""
    backend = resolve_backend(model.layers[0].mixer.scan_backend, device, torch.float32)
    model = _away_from_init(model) if random_weights else model
    reductions = _reductions(model)
    want = _reference(model, x, reductions)
    base = _errors(model, x, torch.device("cpu"), reductions, want, "torch")
    same = backend == "torch" and torch.device(device).type == "cpu"
    errs = base if same else _errors(model, x, device, reductions, want)
    allowed = [TOLERANCE + SLACK * b for b in base]
    worst = max(range(len(errs)), key=lambda i: errs[i] / allowed[i])
    record = {"backend": backend, "device": str(device), "dtype": "float32", "max_rel_error": max(errs),
              "torch_float32_error": max(base), "worst_output": worst, "worst_error": errs[worst],
              "worst_allowed": allowed[worst], "tolerance": f"{TOLERANCE:g} + {SLACK:g} x the torch backend's float32 error",
              "images": int(x.shape[0])}
    if not errs[worst] <= allowed[worst]:
        raise SelfCheckFailed(f"self-check failed: scan backend {backend!r} on {device} gives outputs {errs[worst]:.1e} "
                              f"(relative) off the float64 torch copy where the torch backend in float32 is "
                              f"{base[worst]:.1e} off (allowed {allowed[worst]:.1e}), so this run's numbers would be "
                              f"wrong; choose another backend (e.g. STM_SCAN_BACKEND=torch) or check the installation "
                              f"(--no-self-check skips this check)")
    return record


def describe_check(record) -> str:
    """The one line a run prints about its self-check."""
    return (f"self-check: scan backend {record['backend']} on {record['device']} (float32) is within "
            f"{record['max_rel_error']:.1e} of the float64 torch copy (the torch backend in float32: "
            f"{record['torch_float32_error']:.1e}; allowed per output: {record['tolerance']}; {record['images']} images)")
