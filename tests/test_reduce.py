"""stm_fast.reduction: one API for STM and its peers; rates, schedules, bitwise no-ops, per-image bookkeeping, errors."""

import pytest
import torch

import stm_fast
import stm_fast.registry
from stm_fast.layer_stats import StatsRequest
from stm_fast.reduction import METHODS, rate_of, solve_schedule
from tests.builders import random_model

# every registered method with its defaults, and a few variants whose rate solving differs
METHOD_OPTIONS = [(n, {}) for n in METHODS] + [("stm", {"sides": "left"}), ("stm", {"weights": "avg"}),
                                                ("stm", {"positions": "uniform"}), ("tome", {"layers": "all"}),
                                                ("top", {"align": False}), ("mtr", {"keep_frac": 0.0})]
EXAMPLES = [(n, o) for n, cls in METHODS.items() for o in cls.example_options(4)]  # every method's every choice


def example_schedule(m, method, options):
    return stm_fast.reduction.method_class(method)(m.cfg, **options).example_schedule(units=2)


@pytest.fixture(scope="module")
def vim_tiny():
    return stm_fast.create_model("vim_tiny")


@pytest.mark.parametrize("method,options", METHOD_OPTIONS)
@pytest.mark.parametrize("rate", [0.15, 0.2, 0.3, 0.4])
def test_rates_are_met_within_one_point_on_vim_tiny(vim_tiny, method, options, rate):
    """docs/conventions.md §6: achieved rate within ±1 point; the schedule, tokens per layer and rate are reported and consistent."""
    stm_fast.reduce(vim_tiny, method, rate=rate, **options)
    r = vim_tiny.reduction
    assert abs(r.rate - rate) <= 0.01
    assert r.method == method and r.requested_rate == rate
    tpl = r.tokens_per_layer
    assert tpl[0] == 197 and len(tpl) == 24 and len(r.schedule) == 23
    assert all(tpl[i + 1] == tpl[i] - r.schedule[i] for i in range(23))
    assert r.rate == pytest.approx(1 - sum(tpl) / (24 * 197))
    if method == "stm" and options.get("sides", "both") == "both":
        assert all(k % 2 == 0 for k in r.schedule), "both sides lose the same number of tokens"
    if method == "top":
        assert {i for i, k in enumerate(r.schedule) if k} <= {4, 9, 14}
    stm_fast.reduce(vim_tiny, "none")


@pytest.mark.parametrize("method,options", METHOD_OPTIONS)
@pytest.mark.parametrize("rate", [0.15, 0.2, 0.3, 0.4])
def test_rates_are_met_at_730_tokens(method, options, rate):
    """The stride-8 Vim-Ti+ (730 tokens, class token at 364: 364 tokens left of it, 365 right): every method and
    rate is met within ±1 point; the reported tokens follow the schedule."""
    cfg = stm_fast.registry.MODEL_CONFIGS["vim_tiny_plus"]
    r = stm_fast.make_reduction(cfg, method, rate=rate, **options)
    assert abs(r.rate - rate) <= 0.01 and r.tokens_per_layer[0] == 730
    assert all(r.tokens_per_layer[i + 1] == r.tokens_per_layer[i] - r.schedule[i] for i in range(23))


def test_stm_budget_at_730_tokens_keeps_one_token_per_side():
    """Both sides: min(364, 365) - 1 = 363 per side can go, 726 in total; one side (right) 364."""
    cfg = stm_fast.registry.MODEL_CONFIGS["vim_tiny_plus"]
    assert sum(stm_fast.make_reduction(cfg, "stm", schedule=[726] + [0] * 22).schedule) == 726
    with pytest.raises(ValueError, match="more than the 726"):
        stm_fast.make_reduction(cfg, "stm", schedule=[728] + [0] * 22)
    assert sum(stm_fast.make_reduction(cfg, "stm", schedule=[364] + [0] * 22, sides="right").schedule) == 364


@pytest.mark.parametrize("method,options", EXAMPLES)
def test_rate_zero_and_none_are_bitwise_the_unreduced_model(method, options):
    m = random_model(1, 16, 4, 12, 4, 8, dtype=torch.float32)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        base = m(x)
        stm_fast.reduce(m, method, rate=0, **options)
        assert torch.equal(m(x), base)
        stm_fast.reduce(m, method, schedule=[0, 0, 0], **options)
        assert torch.equal(m(x), base)
        stm_fast.reduce(m, method, schedule=example_schedule(m, method, options), **options)
        assert not torch.equal(m(x), base), "a real reduction changes the logits"
        stm_fast.reduce(m, "none")
        assert torch.equal(m(x), base)
        assert m.reduction is None


@pytest.mark.parametrize("method,options", EXAMPLES)
def test_each_image_is_reduced_as_if_alone(method, options):
    """Data-dependent methods keep per-image indices (the class token can move differently per image):
    in float64, image i in a batch gives the same logits as image i alone."""
    m = random_model(2, 16, 4, 12, 4, 8)
    stm_fast.reduce(m, method, schedule=example_schedule(m, method, options), **options)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        batch = m(x)
        for i in range(4):
            torch.testing.assert_close(batch[i:i + 1], m(x[i:i + 1]), rtol=1e-12, atol=1e-12)


def test_schedule_solver_is_as_uniform_as_possible():
    s = solve_schedule(24, 197, 0.2, range(23), step_unit=2)
    nonzero = [k for k in s if k]
    assert max(nonzero) - min(nonzero) <= 2 and all(k % 2 == 0 for k in s)
    tpl = [197]
    for k in s:
        tpl.append(tpl[-1] - k)
    assert abs(rate_of(tpl) - 0.2) <= 0.01


@pytest.mark.parametrize("call,match", [
    (lambda m: stm_fast.reduce(m, "magic", rate=0.2), "unknown reduction method 'magic'"),
    (lambda m: stm_fast.reduce(m, "stm", rate=0.2, sidez="both"), r"unknown option\(s\) \['sidez'\]"),
    (lambda m: stm_fast.reduce(m, "stm", rate=0.2, schedule=[2]), "exactly one of rate= or schedule="),
    (lambda m: stm_fast.reduce(m, "stm"), "exactly one of rate= or schedule="),
    (lambda m: stm_fast.reduce(m, "stm", rate=20), r"rate must be in \[0, 1\) \(a fraction: 0.2 means 20%\)"),
    (lambda m: stm_fast.reduce(m, "stm", rate=0.99), "feasible rates run from 0 to 94"),
    (lambda m: stm_fast.reduce(m, "stm", schedule=[3]), "must be even"),
    (lambda m: stm_fast.reduce(m, "stm", schedule=[2] * 30), "only 23 merge points"),
    (lambda m: stm_fast.reduce(m, "stm", schedule=[-2]), "non-negative integers"),
    (lambda m: stm_fast.reduce(m, "stm", schedule=[200]), "more than the 194"),
    (lambda m: stm_fast.reduce(m, "stm", rate=0.2, start_layer=23), "start_layer must be an integer in 0..22"),
    (lambda m: stm_fast.reduce(m, "stm", rate=0.2, weights="median"), "weights must be one of"),
    (lambda m: stm_fast.reduce(m, "stm", schedule=[0, 2], start_layer=2), "cannot reduce after layer 1"),
    (lambda m: stm_fast.reduce(m, "tome", rate=0.2, layers="middle"), "tome: layers must be one of"),
    (lambda m: stm_fast.reduce(m, "tome", schedule=[0, 120]), "one step removes at most 98"),
    (lambda m: stm_fast.reduce(m, "top", rate=0.2, layers=[30]), "out of range"),
    (lambda m: stm_fast.reduce(m, "none", rate=0.2), "takes no rate"),
])
def test_bad_requests_are_clear_errors(vim_tiny, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(vim_tiny)


def test_top_alignment_changes_the_decay_of_later_layers():
    """ToP's hidden-state alignment (on by default) makes a kept token decay over the pruned gap."""
    m = random_model(3, 16, 4, 12, 4, 8)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        a = stm_fast.reduce(m, "top", schedule=[0, 6, 0], layers=[1])(x)
        b = stm_fast.reduce(m, "top", schedule=[0, 6, 0], layers=[1], align=False)(x)
    assert not torch.allclose(a, b)


def test_reduction_is_reported():
    m = random_model(3, 16, 4, 12, 4, 8)
    stm_fast.reduce(m, "stm", schedule=2, weights="decay")
    r = m.reduction
    assert r.schedule == (2, 2, 2) and r.tokens_per_layer == (17, 15, 13, 11)
    assert r.options == {"sides": "both", "positions": "ends", "weights": "decay", "start_layer": 0}


@pytest.mark.parametrize("cls", [[0, 0, 0], [1, 1, 1], [8, 8, 8], [16, 16, 16], [3, 9, 8], [0, 16, 5]])
def test_evit_class_attention_is_eq5_written_out(cls):
    """float64: class_attention (each direction reads only its side of the class tokens) equals eq. 5 summed
    by hand, |delta_j sum_n C_cls[n] exp(A S_j) B_j[n]| averaged over channels, per image and per-image class
    positions, including a class token at either end."""
    from stm_fast.reduction.evit import class_attention

    torch.manual_seed(sum(cls))
    model = stm_fast.create_model("vim_tiny", img_size=16, patch_size=4, embed_dim=8, depth=1, d_state=4,
                                  num_classes=3, dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    mixer = model.layers[0].mixer
    with torch.no_grad():
        _, stats = mixer(torch.randn(3, 17, 8, dtype=torch.float64), request=StatsRequest())
    got = class_attention(stats, torch.tensor(cls))
    for i, c in enumerate(cls):
        for j in range(17):
            if j == c:
                assert got[i, j] == 0
                continue
            s = stats.direction(forward=j < c)
            d, B, C, A = s.delta[i], s.B[i], s.C[i], s.A  # position order: (E, L), (N, L), (N, L), (E, N)
            steps = range(j + 1, c + 1) if j < c else range(c, j)
            S = sum((d[:, t] for t in steps), torch.zeros(d.shape[0], dtype=torch.float64))
            alpha = d[:, j] * (torch.exp(A * S[:, None]) * (C[:, c] * B[:, j])[None, :]).sum(1)
            torch.testing.assert_close(got[i, j], alpha.abs().mean(), rtol=1e-12, atol=1e-300)
