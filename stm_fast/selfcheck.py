"""Every run checks itself first: the scan backend and device a run will use, against a float64 copy through
the torch backend on the CPU, on a small batch, for the unreduced model and one STM reduction: the logits and
every layer's mixer output, each relative to its own scale. Like is compared with like:

* **float32, TF32 off.** The run's backend on its device, in float32 with CUDA's TF32 switched off for the
  check (cuDNN runs float32 convolutions in TF32 by default, which moves a trained model's logits by 1e-4 to
  1e-3 and has nothing to do with the scan), against an allowance of ``TOLERANCE`` plus ``SLACK`` times the
  float32 torch backend's own error on the CPU (float32 round-off grows through the layers of a deep model).
* **The run's precision.** Under bf16/fp16 autocast, the same backend under the same autocast (and the run's
  TF32 settings), against ``AMP_TOLERANCE`` plus ``SLACK`` times the error of the torch backend on the same
  device under the same autocast: a same-precision reference. When the run's backend is the torch backend
  this part has nothing to compare and records its error only.

``python -m stm_fast.eval`` and ``python -m stm_fast.bench`` call ``self_check`` before any work; beyond the
allowance they stop with one line naming the backend, the device, the precision, the error and how to choose
another backend; within it the result is recorded (``self_check`` in ``run.json``, in every results record
and in the bench's rows: the backends that actually ran, the precision, the TF32 settings) and printed in
one line. ``--no-self-check`` skips it.
"""

from __future__ import annotations

import copy

import torch

from .reduction import make_reduction, reduced
from .runtime import autocast, tf32_off, tf32_settings
from .ssm import backends_used, resolve_backend

__all__ = ["self_check", "SelfCheckFailed", "TOLERANCE", "AMP_TOLERANCE", "describe_check"]

TOLERANCE = 1e-4  # float32 kernels that agree differ by ~1e-6 of the logit scale; a broken one by far more
AMP_TOLERANCE = 1e-3  # under bf16/fp16 autocast the same-precision torch reference is itself ~1e-2 off
SLACK = 4.0  # a correct kernel's error is about the torch backend's at the same precision (0.9x-1.1x on Vim-Ti)


class SelfCheckFailed(RuntimeError):
    """The backend a run would use is further from the float64 torch copy than its allowance: its numbers
    would be wrong."""


def _outputs(model, x, reduction, precision="fp32"):
    """Logits and every layer's mixer output (a freshly initialised model's layers move its logits little,
    so the mixer outputs are what shows a wrong scan)."""
    seen = []
    hooks = [layer.mixer.register_forward_hook(lambda mod, args, out: seen.append(out[0].double().cpu()))
             for layer in model.layers]
    try:
        with torch.inference_mode(), reduced(model, reduction), autocast(x.device, precision):
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


def _errors(model, x, device, reductions, want, backend=None, precision="fp32"):
    """(relative errors output by output, the backends that ran) of a float32 copy of ``model`` on ``device``
    (``backend``, or its own choice) under ``precision``'s autocast, against the float64 outputs ``want``."""
    checked = copy.deepcopy(model).to(dtype=torch.float32, device=device)
    if backend:
        checked.set_scan_backend(backend)
    with backends_used() as used:
        got = [out for r in reductions for out in _outputs(checked, x.float().to(device), r, precision)]
    return [_relative(g, w) for g, w in zip(got, want)], sorted(used)


def _verdict(errs, base, floor):
    """(index of the worst output relative to its allowance, the allowances) for errors ``errs`` against the
    reference errors ``base`` (allowance = floor + SLACK x the reference's error, output by output)."""
    allowed = [floor + SLACK * b for b in base]
    return max(range(len(errs)), key=lambda i: errs[i] / allowed[i]), allowed


def _fail(backend, device, precision, err, base, allowed, reference):
    return SelfCheckFailed(
        f"self-check failed: scan backend {backend!r} on {device} gives outputs {err:.1e} (relative, {precision}) off "
        f"the float64 torch copy where {reference} is {base:.1e} off (allowed {allowed:.1e}), so this run's numbers "
        f"would be wrong; choose another backend (e.g. STM_SCAN_BACKEND=torch), another --dtype, or check the "
        f"installation (--no-self-check skips this check)")
def self_check(model, x, device, random_weights=False, precision="fp32") -> dict:
    """Check ``model`` on ``device`` (its own scan backend choice) against a float64 copy on the CPU through
    the torch backend, on the images ``x``, output by output: in float32 with TF32 off (allowance from the
    CPU float32 torch backend's error), and, for ``precision`` bf16/fp16, under that autocast (allowance from
    the torch backend's error on the same device and precision). ``random_weights``: the model is freshly
    initialised (the bench), so the check runs on a copy moved away from its initialisation. Returns the
    record; raises SelfCheckFailed beyond an allowance."""
    device = torch.device(device)
    chosen = resolve_backend(model.layers[0].mixer.scan_backend, device, torch.float32)
    model = _away_from_init(model) if random_weights else model
    reductions = _reductions(model)
    want = _reference(model, x, reductions)
    with tf32_off():  # on every device: the flags are global, and a CPU emulation of TF32 reads them too
        base, _ = _errors(model, x, torch.device("cpu"), reductions, want, "torch")
        same = chosen == "torch" and device.type == "cpu"
        errs, used = (base, ["torch"]) if same else _errors(model, x, device, reductions, want)
    worst, allowed = _verdict(errs, base, TOLERANCE)
    record = {"backend": "+".join(used) or chosen, "device": str(device), "dtype": "float32", "precision": precision,
              "max_rel_error": max(errs), "torch_float32_error": max(base), "worst_output": worst,
              "worst_error": errs[worst], "worst_allowed": allowed[worst],
              "tolerance": f"{TOLERANCE:g} + {SLACK:g} x the torch backend's float32 error (TF32 off)",
              "tf32_run": tf32_settings() if device.type == "cuda" else None, "images": int(x.shape[0])}
    if not errs[worst] <= allowed[worst]:
        raise _fail(record["backend"], device, "float32, TF32 off", errs[worst], base[worst], allowed[worst],
                    "the torch backend in float32 on the CPU")
    if precision != "fp32":
        record.update(_amp_check(model, x, device, reductions, want, precision))
    return record


def _amp_check(model, x, device, reductions, want, precision) -> dict:
    """The check under the run's autocast: the run's backend vs the torch backend on the same device and
    precision (a torch run records its error only)."""
    errs, used = _errors(model, x, device, reductions, want, None, precision)
    ref, _ = (errs, used) if used == ["torch"] else _errors(model, x, device, reductions, want, "torch", precision)
    worst, allowed = _verdict(errs, ref, AMP_TOLERANCE)
    out = {"amp_backend": "+".join(used), "amp_max_rel_error": max(errs), "amp_torch_error": max(ref),
           "amp_worst_allowed": allowed[worst],
           "amp_tolerance": f"{AMP_TOLERANCE:g} + {SLACK:g} x the torch backend's error on {device} under {precision}"}
    if not errs[worst] <= allowed[worst]:
        raise _fail(out["amp_backend"], device, precision, errs[worst], ref[worst], allowed[worst],
                    f"the torch backend on {device} under {precision}")
    return out


def describe_check(record) -> str:
    """The one line a run prints about its self-check."""
    line = (f"self-check: scan backend {record['backend']} on {record['device']} (float32"
            f"{', TF32 off' if record.get('tf32_run') is not None else ''}) is within {record['max_rel_error']:.1e} of "
            f"the float64 torch copy (the torch backend in float32: {record['torch_float32_error']:.1e}; allowed per "
            f"output: {record['tolerance']}; {record['images']} images)")
    if record.get("amp_backend"):
        line += (f"; under {record['precision']}: {record['amp_backend']} {record['amp_max_rel_error']:.1e} off "
                 f"(the torch backend there: {record['amp_torch_error']:.1e})")
    return line
