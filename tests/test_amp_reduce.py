"""Reduction steps compute in float32 whatever the forward's autocast (docs/conventions.md §10).

Under bf16 autocast the projections run in bf16; a step that ran inside that autocast would form STM's lsq
weights (eq. 11) and ToMe's cosine similarities in bf16 too. These tests run reduced forwards under CPU
bf16 autocast and check, inside every step, that the step computes exactly what it computes with autocast
off on float32 copies of its inputs.
"""

import copy

import pytest
import torch

import stm_fast
from stm_fast.reduction import stm as stm_module
from stm_fast.reduction.base import METHODS
from tests.builders import random_model

# (method, options): every registered method and flavour, at settings a 65-token, 6-layer model can take
CASES = [(m, {}) for m in sorted(METHODS)] + [(m, {"flavour": f}) for m in sorted(METHODS) for f in METHODS[m].flavours]


@pytest.fixture(scope="module")
def model():
    return random_model(3, img_size=32, patch_size=4, embed_dim=16, depth=6, d_state=8, dtype=torch.float32).eval()


def _float32_copy(args):
    i, k, x, tokens, stats = copy.deepcopy(args)
    return i, k, x.float(), tokens, None if stats is None else stats.in_dtype(torch.float32)


@pytest.mark.parametrize("method,options", CASES, ids=lambda v: str(v))
def test_every_step_under_bf16_autocast_computes_what_float32_does(model, method, options):
    """Each step sees autocast off and float32 inputs, and returns what the same step returns on float32
    copies of its inputs with autocast off (bitwise)."""
    seen = []

    def hook(step, args):
        plain_args = _float32_copy(args)
        with torch.autocast("cpu", enabled=False):
            want_x, want_tokens = step(*plain_args)
        seen.append((torch.is_autocast_enabled("cpu"), args[2].dtype))
        got_x, got_tokens = step(*args)
        assert torch.equal(got_x, want_x), f"{method} step {args[0]}: the stream differs from the float32 step's"
        assert torch.equal(got_tokens.pos, want_tokens.pos), f"{method} step {args[0]}: other tokens kept"
        return got_x, got_tokens

    red = stm_fast.make_reduction(model, method, rate=0.2, **options).with_step_hook(hook)
    with stm_fast.reduced(model, red), torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert seen, f"{method}: no step ran"
    assert all(not on and dtype == torch.float32 for on, dtype in seen), seen


def test_stm_lsq_weights_under_bf16_autocast_are_the_float32_maths(model, monkeypatch):
    """STM's lsq weights (eq. 11) come back float32 and equal the weights computed with autocast off from
    float32 copies of the same statistics (in bf16 they differ by ~1e-3 relative)."""
    real, got = stm_module.ends_weights, []

    def recorded(stats, *args):
        with torch.autocast("cpu", enabled=False):
            want = real(copy.deepcopy(stats).in_dtype(torch.float32), *args)
        out = real(stats, *args)
        got.append((out, want))
        return out

    monkeypatch.setattr(stm_module, "ends_weights", recorded)
    red = stm_fast.make_reduction(model, "stm", rate=0.2)
    with stm_fast.reduced(model, red), torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert got
    for (left, right), (w_left, w_right) in got:
        assert left.dtype == right.dtype == torch.float32
        assert torch.equal(left, w_left) and torch.equal(right, w_right)


def test_tome_similarities_under_bf16_autocast_are_float32(model, monkeypatch):
    """Every matrix product inside ToMe's step (its cosine similarities) returns float32 under bf16 autocast."""
    real_matmul, dtypes = torch.Tensor.__matmul__, []

    def hook(step, args):
        def spy(a, b):
            out = real_matmul(a, b)
            dtypes.append(out.dtype)
            return out

        monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
        try:
            return step(*args)
        finally:
            monkeypatch.setattr(torch.Tensor, "__matmul__", real_matmul)

    red = stm_fast.make_reduction(model, "tome", rate=0.2).with_step_hook(hook)
    with stm_fast.reduced(model, red), torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    assert dtypes and all(d == torch.float32 for d in dtypes), dtypes
