"""The fast path on this machine, certified against the float64 reference: every scan backend on every
device available here, on small Vision Mambas with every reduction method.

Hypothesis draws the model (image, patch and stride, depth, width, d_state, batch including 1; odd grids put
the class token off-centre) and a reduction: every method with its options and a schedule, the edges
included (a step that takes a side down to one token, per-image class positions of the data-dependent
methods, the released flavours). For each (device, backend):

* float64 logits equal ``stm_ref.vim.forward`` to 1e-9, and logits and every final token (after the final
  norm) equal the reference's to 1e-11 of their scale (where the backend computes float64; round-off is
  below 1e-14 at these sizes);
* float32 logits (bf16 autocast on CUDA) are no further from the float64 reference than twice the torch
  backend's own float32 (bf16) error on the same inputs, plus a floor of 1e-6 (bf16: 1e-3) of the logit
  scale: the bound means the same on every device. This one runs the methods without discrete data-
  dependent choices (none, stm): a float32 near-tie can flip a ToMe/ToP/EViT/MTR choice, which is not an
  error of the backend.

The test ids name what was certified (``cpu-torch``, ``cuda-triton`` ...); a line at the end of the run
(``verify/conftest.py``) lists the combinations certified and those not available here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given

from stm_fast.reduction import METHODS
from verify.fast_path import (CANDIDATES, DRAWN, cases, check_float64, check_rate, coverage_cases, inputs, logits, model,
                              reference, require)

TARGETS = [pytest.param(d, b, f64, id=f"{d}-{b}") for d, b, f64 in CANDIDATES]


def test_the_certification_draws_every_registered_method_and_targets_every_automatic_backend():
    """Every registered method and flavour is among the draws, and every (device, backend) the automatic choice
    can pick is a target (the list this machine can run is narrowed when the tests run, not here)."""
    assert {(n, None) for n in METHODS} | {(n, f) for n, cls in METHODS.items() for f in cls.flavours} <= set(DRAWN)
    assert {("cpu", "fused"), ("cpu", "torch"), ("cuda", "mamba_ssm"), ("cuda", "triton"), ("cuda", "torch")} <= \
        {(d, b) for d, b, _ in CANDIDATES}
    assert ("cpu", "loop") not in {(d, b) for d, b, _ in CANDIDATES}, "the floor is no target"


@pytest.mark.parametrize("device,backend,f64", TARGETS)
@given(case=cases())
def test_fast_path_equals_the_reference_in_float64(device, backend, f64, case):
    """float64 logits of the fast model through this backend and device = stm_ref.vim.forward (<= 1e-9 and
    <= 1e-11 of the logit scale)."""
    require(device, backend)
    if not f64:
        pytest.skip(f"{backend} computes float32/16/bf16 only")
    check_float64(case, device, backend)


@pytest.mark.parametrize("device,backend,f64", TARGETS)
def test_every_method_and_option_equals_the_reference_in_float64(device, backend, f64):
    """The float64 property on the fixed coverage cases: every registered method and flavour with each of its
    example options, whatever the search happens to draw."""
    require(device, backend)
    if not f64:
        pytest.skip(f"{backend} computes float32/16/bf16 only")
    for case in coverage_cases():
        check_float64(case, device, backend)


@pytest.mark.parametrize("device,backend,f64", TARGETS)
@pytest.mark.parametrize("precision", ["f32", "bf16"])
@given(case=cases())
def test_fast_path_low_precision_error_is_at_most_twice_the_torch_backends(device, backend, f64, precision, case):
    """float32 (bf16 autocast, CUDA only) logits through this backend: error vs the float64 reference <= 2x the
    torch backend's error in the same precision on the same device, + a floor (module docstring)."""
    if precision == "bf16" and device != "cuda":
        pytest.skip("bf16 autocast is certified on CUDA")
    require(device, backend)
    assume(case["method"] in ("none", "stm"))
    m64 = model(case, torch.float64)
    want = reference(m64, inputs(case))
    m = m64.float()
    amp = torch.bfloat16 if precision == "bf16" else None
    x = inputs(case).float()
    err = np.abs(logits(m, x, device, backend, amp) - want).max()
    err_torch = np.abs(logits(m, x, device, "torch", amp) - want).max()
    floor = (1e-3 if amp else 1e-6) * (1 + np.abs(want).max())
    assert err <= 2 * err_torch + floor, f"{backend} error {err:.3e} vs torch {err_torch:.3e} (floor {floor:.1e})"


@given(case=cases())
def test_reported_rate_is_the_rate_of_the_tokens_each_layer_receives(case):
    """docs/conventions.md §6: the Reduction's rate = 1 - sum_l N_l / (depth * N_0), with N_l counted on the
    tokens that actually enter each layer of a forward (a hook on every layer), and its tokens_per_layer
    are those counts."""
    check_rate(case)
