"""Every run checks itself first: the scan backend and device a run will use, against the torch backend on
the CPU in float32, on a small batch, for the unreduced model and one STM reduction: the logits and every
layer's mixer output, each relative to its own scale.

``python -m stm_fast.eval`` and ``python -m stm_fast.bench`` call ``self_check`` before any work; beyond
``TOLERANCE`` (relative to the logit scale) they stop with one line naming the backend, the device, the
error and how to choose another backend; within it the result is recorded (``self_check`` in ``run.json``,
in every results record and in the bench's rows) and printed in one line. ``--no-self-check`` skips it.
"""

from __future__ import annotations

import copy

import torch

from .reduction import make_reduction, reduced
from .ssm import resolve_backend

__all__ = ["self_check", "SelfCheckFailed", "TOLERANCE", "describe_check"]

TOLERANCE = 1e-4  # float32 kernels that agree differ by ~1e-6 of the logit scale; a broken one by far more


class SelfCheckFailed(RuntimeError):
    """The backend a run would use disagrees with the torch backend: its numbers would be wrong."""


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


def self_check(model, x, device, random_weights=False) -> dict:
    """Compare ``model`` on ``device`` (its own scan backend choice) with a float32 copy on the CPU through the
    torch backend, on the images ``x``. ``random_weights``: the model is freshly initialised (the bench), so
    the check runs on a copy moved away from its initialisation. Returns the record; raises SelfCheckFailed
    beyond TOLERANCE."""
    backend = resolve_backend(model.layers[0].mixer.scan_backend, device, torch.float32)
    model = _away_from_init(model) if random_weights else model
    ref = copy.deepcopy(model).float().cpu().set_scan_backend("torch")
    checked = copy.deepcopy(model).float().to(device)
    err = 0.0
    for reduction in _reductions(model):
        want = _outputs(ref, x.float().cpu(), reduction)
        got = _outputs(checked, x.float().to(device), reduction)
        err = max([err] + [_relative(g, w) for g, w in zip(got, want)])
    record = {"backend": backend, "device": str(device), "dtype": "float32", "max_rel_error": err,
              "tolerance": TOLERANCE, "images": int(x.shape[0])}
    if not err <= TOLERANCE:
        raise SelfCheckFailed(f"self-check failed: scan backend {backend!r} on {device} gives outputs {err:.1e} (relative) "
                              f"off the torch backend's on the CPU (tolerance {TOLERANCE:g}), so this run's numbers would be "
                              f"wrong; choose another backend (e.g. STM_SCAN_BACKEND=torch) or check the installation "
                              f"(--no-self-check skips this check)")
    return record


def describe_check(record) -> str:
    """The one line a run prints about its self-check."""
    return (f"self-check: scan backend {record['backend']} on {record['device']} agrees with the torch backend on the "
            f"CPU to {record['max_rel_error']:.1e} relative (tolerance {record['tolerance']:g}, {record['images']} images)")
