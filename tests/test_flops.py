"""stm_fast.flops: analytic multiply-add counts of Vision Mamba, against hand computations from the formula."""

import math

import pytest

from stm_fast import create_model
from stm_fast.flops import flops
from stm_fast.reduction import Reduction, make_reduction


def value(tokens, overhead=None):
    """A Reduction value with these tokens per layer (what flops reads of it), built by hand."""
    schedule = tuple(a - b for a, b in zip(tokens, tokens[1:]))
    return Reduction(method="stm", options={}, schedule=schedule, tokens_per_layer=tuple(tokens), rate=0.0,
                     requested_rate=None, overhead_flops_per_layer=tuple(overhead or (0,) * len(schedule)))

PAPER_GFLOPS = {"vim_tiny": 1.45, "vim_small": 5.08, "vim_base": 18.87}


def hand_layer(d, L, N=16, K=4, convention="paper"):
    """One layer's MACs written out directly (independent of stm_fast.flops.layer_flops)."""
    E = 2 * d
    R = math.ceil(d / 16)
    in_out = L * d * (2 * E) + L * E * d
    one_dir = L * E * K + L * E * (R + 2 * N) + L * R * E + 9 * L * E * N + 2 * L * E
    return in_out + (2 if convention == "full" else 1) * one_dir


def hand_extra_direction(d, L, N=16, K=4):
    E = 2 * d
    R = math.ceil(d / 16)
    return L * E * K + L * E * (R + 2 * N) + L * R * E + 9 * L * E * N + 2 * L * E


@pytest.fixture(scope="module")
def models():
    # built once each; vim_base is ~90M parameters
    return {name: create_model(name) for name in PAPER_GFLOPS}


@pytest.mark.parametrize("name", sorted(PAPER_GFLOPS))
def test_paper_baselines(models, name):
    r = flops(models[name], 224, convention="paper")
    assert r["convention"] == "paper"
    assert r["total"] == pytest.approx(PAPER_GFLOPS[name], rel=5e-3)
    assert r["tokens_per_layer"] == [197] * 24
    assert r["overhead"] == 0
    assert r["total_with_overhead"] == r["total"]
    # independent whole-model hand computation
    d = models[name].cfg.embed_dim
    hand = 24 * hand_layer(d, 197) + 196 * 3 * 16 * 16 * d + d * 1000
    assert r["total"] == pytest.approx(hand * 1e-9, rel=1e-12)


@pytest.mark.parametrize("name", sorted(PAPER_GFLOPS))
def test_full_adds_one_direction(models, name):
    m = models[name]
    paper, full = flops(m, convention="paper"), flops(m, convention="full")
    assert full["convention"] == "full"
    assert full["total"] > paper["total"]
    extra = 24 * hand_extra_direction(m.cfg.embed_dim, 197) * 1e-9
    assert full["total"] - paper["total"] == pytest.approx(extra, rel=1e-9)
    assert full["layers"] - paper["layers"] == pytest.approx(extra, rel=1e-9)


@pytest.fixture()
def small():
    # img 64 / patch 16 -> 16 patches, L = 17 tokens; depth 4; d = 40 -> dt_rank 3 (ceil matters)
    return create_model("vim_tiny", img_size=64, embed_dim=40, depth=4, d_state=8, num_classes=10)


def test_reduction_tokens_per_layer(small):
    L, d = 17, 40
    base = flops(small, 64)
    assert base["tokens_per_layer"] == [L] * 4
    tokens = [17, 17, 9, 5]
    small.reduction = value(tokens)
    r = flops(small, 64)
    assert r["method"] == "stm" and r["tokens_per_layer"] == tokens
    hand_layers = sum(hand_layer(d, n, N=8) for n in tokens)
    assert r["layers"] == pytest.approx(hand_layers * 1e-9, rel=1e-12)
    # layer cost is linear in tokens: proportional to the token count
    assert r["layers"] == pytest.approx(base["layers"] * sum(tokens) / (4 * L), rel=1e-12)
    # patch embed and head are unchanged
    stem_head = (16 * 3 * 16 * 16 * d + d * 10) * 1e-9
    assert r["total"] == pytest.approx(hand_layers * 1e-9 + stem_head, rel=1e-12)
    assert base["total"] - r["total"] == pytest.approx(base["layers"] - r["layers"], rel=1e-9)
    for conv in ("paper", "full"):
        rc = flops(small, 64, convention=conv)
        assert rc["layers"] == pytest.approx(sum(hand_layer(d, n, N=8, convention=conv) for n in tokens) * 1e-9,
                                             rel=1e-12)


def test_reduction_none_means_full_sequence(small):
    small.reduction = make_reduction(small, "none")
    assert flops(small, 64)["tokens_per_layer"] == [17] * 4
    small.reduction = None
    assert flops(small, 64)["tokens_per_layer"] == [17] * 4


def test_overhead_separate(small):
    tokens = [17, 12, 12, 8]
    small.reduction = value(tokens)
    no_oh = flops(small, 64)
    assert no_oh["overhead"] == 0
    small.reduction = value(tokens, [123_456, 0, 7_890])
    r = flops(small, 64)
    assert r["overhead"] == pytest.approx((123_456 + 7_890) * 1e-9, rel=1e-12)
    assert r["total"] == pytest.approx(no_oh["total"], rel=1e-15)  # not included in total
    assert r["total_with_overhead"] == pytest.approx(r["total"] + r["overhead"], rel=1e-12)


def test_bad_reduction_rejected(small):
    """A reduction made for another configuration does not describe this one: a clear error."""
    with pytest.raises(ValueError, match="depth"):
        flops(small.cfg, 64, reduction=value([17, 9]))  # wrong length
    with pytest.raises(ValueError, match=r"must lie in \[1, 17\]"):
        flops(small.cfg, 64, reduction=value([17, 18, 9, 9]))  # more than L


def test_config_and_reduction_without_a_model(small):
    """flops(cfg, reduction=...) equals flops(model) with that reduction installed, and a model's own
    reduction can be overridden by an explicit one."""
    red = make_reduction(small, "stm", schedule=[4, 2, 2])
    small.reduction = red
    assert flops(small.cfg, reduction=red) == flops(small)
    assert flops(small, reduction=None) == flops(small.cfg)
    assert flops(small.cfg)["tokens_per_layer"] == [17] * 4


def test_img_size_mismatch_raises(small):
    with pytest.raises(ValueError, match="img_size"):
        flops(small, 224)
    assert flops(small) == flops(small, 64), "without img_size the model's own is used"


def test_unknown_convention_raises(small):
    with pytest.raises(ValueError, match="convention"):
        flops(small, 64, convention="fvcore")


@pytest.mark.parametrize("name,d,paper,full", [("vim_tiny_plus", 192, 5.3687, 6.7546), ("vim_small_plus", 384, 18.8107, 21.9054)])
def test_stride_8_models_follow_the_same_formula(name, d, paper, full):
    """Vim-Ti+ / Vim-S+ (730 tokens): the paper convention is the plain models' formula with L = 730 and a
    patch embedding over 729 overlapping patches (each still 3 x 16 x 16 inputs): 5.37 / 18.81 G, full 6.75 / 21.91 G."""
    cfg = create_model(name).cfg
    hand = 24 * hand_layer(d, 730) + 729 * 3 * 16 * 16 * d + d * 1000
    assert flops(cfg)["total"] == pytest.approx(hand * 1e-9, rel=1e-12)
    assert flops(cfg)["total"] == pytest.approx(paper, abs=1e-4)
    assert flops(cfg, convention="full")["total"] == pytest.approx(full, abs=1e-4)
