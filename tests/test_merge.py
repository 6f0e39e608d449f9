"""stm_fast.reduction.merge (batched torch STM merge) against its float64 twin stm_ref.merge."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from stm_fast.reduction import merge as fast
from stm_fast.layer_stats import DirectionStats, LayerStats, StatsRequest
from stm_ref import merge as ref, ssm


@st.composite
def cases(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    L = draw(st.integers(3, 40))
    cls = draw(st.sampled_from([(L - 1) // 2, draw(st.integers(1, L - 2))]))
    r_left = draw(st.integers(0, max(cls - 1, 0)))
    r_right = draw(st.integers(0, max(L - cls - 2, 0)))
    positions = draw(st.sampled_from(["ends", "uniform"]))
    batch, E, N = draw(st.integers(1, 3)), draw(st.integers(1, 8)), draw(st.integers(1, 16))
    stats = {}
    for d in ("forward", "backward"):
        stats[d] = dict(delta=rng.uniform(1e-3, 1.5, (batch, E, L)), B=rng.standard_normal((batch, N, L)),
                        A=-np.exp(rng.uniform(np.log(1e-2), np.log(16), (E, N))))
    return L, cls, r_left, r_right, positions, stats, rng


# size weights come from the tokens' sizes (STM's step) and lsq_joint also reads u: tests/test_reduce_reference.py
FROM_STATISTICS = [v for v in ref.TOKEN_WEIGHT_VARIANTS if v not in ("size", "lsq_joint")]


@pytest.mark.parametrize("variant", FROM_STATISTICS)
@settings(max_examples=12)
@given(case=cases())
def test_token_weights_match_reference(variant, case):
    """float64: each image's weights equal stm_ref.merge.token_weights on its Euler (Abar, Bbar), to 1e-10 relative
    (delta enters through softplus(softplus^-1(delta)), a round trip worth a few ulps)."""
    L, cls, rl, rr, positions, stats, _ = case
    plan = ref.merge_plan(L, cls, rl, rr, positions)
    pidx = fast.plan_index(L, cls, rl, rr, positions)
    tstats = {}
    for d, s in stats.items():  # DirectionStats in token position order, as the mixer stores them
        raw = torch.as_tensor(np.log(np.expm1(s["delta"])))  # softplus^-1, so that softplus(raw + 0) = delta
        B = torch.as_tensor(s["B"])
        tstats[d] = DirectionStats(raw, torch.zeros(raw.shape[1], dtype=torch.float64), B, B,
                                   torch.as_tensor(s["A"]), None, reverse=d == "backward")
    w = fast.token_weights(LayerStats(tstats["forward"], tstats["backward"]), pidx, variant).numpy()
    for b in range(w.shape[0]):
        expected = {}
        for d in ("forward", "backward"):
            s = stats[d]
            Abar, Bbar = ssm.discretize(s["delta"][b].T, s["A"], s["B"][b].T, "euler")
            expected.update(ref.token_weights(Abar, Bbar, plan, d, variant))
        got = dict(zip(plan.reduced.tolist(), w[b]))
        assert set(got) == set(expected)
        for j in got:
            np.testing.assert_allclose(got[j], expected[j], rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize("variant", ref.TOKEN_WEIGHT_VARIANTS)
@settings(max_examples=12)
@given(case=cases())
def test_merge_tokens_matches_reference(variant, case):
    """The gather + index_add merge equals stm_ref.merge.merge_tokens for every image, order preserved."""
    L, cls, rl, rr, positions, _, rng = case
    plan = ref.merge_plan(L, cls, rl, rr, positions)
    pidx = fast.plan_index(L, cls, rl, rr, positions)
    x = rng.standard_normal((2, L, 5))
    w = rng.uniform(-0.5, 1.5, (2, len(plan.reduced)))
    got = fast.merge_tokens(torch.as_tensor(x), pidx, torch.as_tensor(w), variant).numpy()
    for b in range(2):
        expected = ref.merge_tokens(x[b], plan, dict(zip(plan.reduced.tolist(), w[b])), variant)
        np.testing.assert_allclose(got[b], expected, rtol=1e-13, atol=1e-13)
    assert pidx.kept[pidx.new_cls] == cls


@pytest.mark.parametrize("variant", [v for v in ref.TOKEN_WEIGHT_VARIANTS if v != "noise"])
@settings(max_examples=12)
@given(case=cases())
def test_merging_the_stream_sum_equals_merging_both_streams(variant, case):
    """The reducers merge x = residual + mixer output once (stm_fast.reduce): with the weights fixed, every
    merge variant is linear in the tokens, so merge(residual) + merge(hidden) = merge(residual + hidden)
    (docs/conventions.md §3). The noise control is not a merge (it replaces the merged token of the sum,
    as the reference's STM step does: test_noise_control_replaces_the_merged_tokens_of_the_sum)."""
    L, cls, rl, rr, positions, _, rng = case
    pidx = fast.plan_index(L, cls, rl, rr, positions)
    residual, hidden = (torch.as_tensor(rng.standard_normal((2, L, 5))) for _ in range(2))
    w = torch.as_tensor(rng.uniform(-0.5, 1.5, (2, len(pidx.reduced))))
    both = fast.merge_tokens(residual, pidx, w, variant) + fast.merge_tokens(hidden, pidx, w, variant)
    once = fast.merge_tokens(residual + hidden, pidx, w, variant)
    torch.testing.assert_close(once, both, rtol=1e-12, atol=1e-12)


@settings(max_examples=12)
@given(case=cases())
def test_noise_control_replaces_the_merged_tokens_of_the_sum(case):
    """weights='noise' = the plain average of the stream sum, then each token that received a merge replaced
    by its seeded noise row times its own root mean square (the other tokens untouched)."""
    L, cls, rl, rr, positions, _, rng = case
    pidx, plan = fast.plan_index(L, cls, rl, rr, positions), ref.merge_plan(L, cls, rl, rr, positions)
    x = torch.as_tensor(rng.standard_normal((2, L, 5)))
    ones = torch.ones(2, len(pidx.reduced), dtype=x.dtype)
    noised, avg = fast.merge_tokens(x, pidx, ones, "noise"), fast.merge_tokens(x, pidx, ones, "avg")
    kept = plan.kept.tolist()
    targets = {int(q) for q in plan.target}
    for i, k in enumerate(kept):
        if k in targets:
            rms = avg[:, i].pow(2).mean(-1, keepdim=True).sqrt()
            torch.testing.assert_close(noised[:, i], torch.as_tensor(ref.noise_row(L, k, 5)) * rms)
        else:
            assert torch.equal(noised[:, i], avg[:, i])


def test_plan_index_is_cached_and_matches_plan():
    a = fast.plan_index(197, 98, 3, 3)
    assert fast.plan_index(197, 98, 3, 3) is a
    assert a.kept.tolist() == list(range(3, 194)) and a.new_cls == 95
    assert a.target_k.tolist() == [0, 0, 0, 190, 190, 190]


@pytest.mark.parametrize("variant", FROM_STATISTICS)
@pytest.mark.parametrize("L,cls,r,positions", [(197, 98, 3, "ends"), (65, 32, 5, "ends"), (65, 20, 1, "ends"), (41, 20, 4, "uniform")])
def test_ends_path_equals_per_side_path(variant, L, cls, r, positions):
    """The ends fast path (slices of the first r+1 scan steps, both directions stacked) computes exactly what
    the general per-side path (gathers by position) computes."""
    g = torch.Generator().manual_seed(L)
    stats = LayerStats(*(DirectionStats(torch.randn(2, 6, L, generator=g, dtype=torch.float64),
                                        torch.randn(6, generator=g, dtype=torch.float64),
                                        torch.randn(2, 4, L, generator=g, dtype=torch.float64), None,
                                        -torch.rand(6, 4, generator=g, dtype=torch.float64) * 8, None, reverse=d == "backward")
                         for d in ("forward", "backward")))
    plan = fast.plan_index(L, cls, r, r, positions)
    assert (plan.ends is not None) == (positions == "ends")
    per_side = torch.cat([fast._side_weights(stats.direction(sd.forward), sd, variant, 1e-6)
                          for sd in plan.sides], dim=1)
    torch.testing.assert_close(fast.token_weights(stats, plan, variant), per_side, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("variant", FROM_STATISTICS)
@pytest.mark.parametrize("rl,rr", [(3, 3), (4, 0), (0, 2), (2, 5)])
def test_weights_from_the_scans_exported_steps_equal_recomputed_ones(variant, rl, rr):
    """float64: the ends-plan weights built from the scan's exported delta/Abar/B of the first steps
    (``LayerStats.first_steps``: suffix products of Abar, no exp) equal those recomputed from the layer statistics
    (softplus and exp(A * sum of delta)), for both sides, one side and unequal sides."""
    from stm_fast import create_model

    torch.manual_seed(rl * 10 + rr)
    model = create_model("vim_tiny", img_size=16, patch_size=4, embed_dim=8, depth=1, d_state=4, num_classes=3,
                         dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    mixer = model.layers[0].mixer
    with torch.no_grad():
        _, stats = mixer(torch.randn(2, 17, 8, dtype=torch.float64), request=StatsRequest(first_steps=max(rl, rr) + 1))
    assert stats.first_steps is not None and stats.first_steps[2] is not None
    without = LayerStats(stats.forward, stats.backward)
    plan = fast.plan_index(17, 8, rl, rr, "ends")
    expected = fast.token_weights(without, plan, variant)
    got = fast.token_weights(stats, plan, variant)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
