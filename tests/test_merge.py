"""stm_fast.reduction.merge (batched torch STM merge) against its float64 twin stm_ref.merge."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from stm_fast.reduction import merge as fast
from stm_fast.layer_stats import DirectionStats, LayerStats, StatsRequest
from stm_fast.ops.common import FirstSteps
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
FROM_STATISTICS = [n for n, v in fast.WEIGHT_VARIANTS.items() if not v.extra_inputs]


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
    per_side = torch.cat([fast._side_weights(stats.direction(sd.forward), sd, fast.weight_variant(variant), 1e-6)
                          for sd in plan.sides], dim=1)
    torch.testing.assert_close(fast.token_weights(stats, plan, variant), per_side, rtol=1e-13, atol=1e-13)


def _layer_stats(seed, n):
    """float64 statistics of a small Vim layer with its scan's first n steps (the torch or fused backend)."""
    from stm_fast import create_model

    torch.manual_seed(seed)
    model = create_model("vim_tiny", img_size=16, patch_size=4, embed_dim=8, depth=1, d_state=4, num_classes=3,
                         dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        _, stats = model.layers[0].mixer(torch.randn(2, 17, 8, dtype=torch.float64), request=StatsRequest(first_steps=n))
    return stats


@pytest.mark.parametrize("variant", FROM_STATISTICS)
@pytest.mark.parametrize("rl,rr", [(3, 3), (4, 0), (0, 2), (2, 5)])
def test_weights_from_the_scans_exported_steps_equal_recomputed_ones(variant, rl, rr):
    """float64: the ends-plan weights built from the scan's exported delta/Abar/B of the first steps
    (``LayerStats.take_first_steps``: suffix products of Abar, no exp) equal those recomputed from the layer statistics
    (softplus and exp(A * sum of delta)), for both sides, one side and unequal sides."""
    stats = _layer_stats(rl * 10 + rr, max(rl, rr) + 1)
    assert stats.first_steps is not None and all(f.B is not None for f in stats.first_steps)
    without = LayerStats(stats.forward, stats.backward)
    plan = fast.plan_index(17, 8, rl, rr, "ends")
    expected = fast.token_weights(without, plan, variant)
    got = fast.token_weights(stats, plan, variant)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_the_table_defines_exactly_the_references_variants():
    """One record per variant of stm_ref.merge (the reference's names and order), and the lists the reference
    keeps by hand (weighted averages, no statistics read) are what the records say."""
    assert tuple(fast.WEIGHT_VARIANTS) == fast.TOKEN_WEIGHT_VARIANTS == ref.TOKEN_WEIGHT_VARIANTS
    assert fast.NORMALISED_VARIANTS == ref.NORMALISED_VARIANTS
    assert fast.CONSTANT_VARIANTS == ref.CONSTANT_VARIANTS
    assert all(name == v.name for name, v in fast.WEIGHT_VARIANTS.items())
    assert FAST_FORMS, "some variant has a faster form to check"
    with pytest.raises(ValueError, match="exactly one definition"):
        fast.WeightVariant(name="both", constant=1.0, pair=fast.weight_variant("lsq").pair)
    with pytest.raises(ValueError, match="must be one of"):
        fast.weight_variant("median")


FAST_FORMS = [(v, form) for v in fast.TOKEN_WEIGHT_VARIANTS for form in fast.fast_forms(v)]  # nothing probed


def _definition_on_first_steps(spec, d, abar, B, r, clamp=1e-6):
    """The variant's one definition on step-major first steps, (S, batch, r) in scan order: P_j = Abar_{j+1} ..
    Abar_r by a reversed cumulative product (eq. 11)."""
    P = abar[1:r + 1].flip(0).cumprod(0).flip(0)
    return spec.pair(P, d[:r], d[r:r + 1], B[:r], B[r:r + 1], clamp).permute(1, 2, 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("variant,form", FAST_FORMS, ids=[f"{v}-{f}" for v, f in FAST_FORMS])
def test_every_fast_form_equals_its_variants_definition(variant, form, dtype):
    """Every faster form registered for a variant (its batched torch form, each compiled weight kernel naming it,
    ``merge.fast_forms``) computes that variant's definition from the scan's first steps, for r = 1 .. n - 1,
    weights of both signs: float64 within 1e-12 of the weights' scale; float32 no further from the float64
    definition than 4x the float32 definition's own error (+ 4 float32 ulps of the scale)."""
    spec = fast.weight_variant(variant)
    rng = np.random.default_rng(15)
    n, S, batch, N, E = 6, 2, 3, 16, 37
    d64 = torch.tensor(rng.uniform(0.01, 1, (n, S, batch, E)))
    a64 = torch.tensor(rng.uniform(0.3, 1, (n, S, batch, N, E)))
    B64 = torch.tensor(rng.standard_normal((n, S, batch, N)))
    d, a, B = (t.to(dtype) for t in (d64, a64, B64))
    for r in range(1, n):
        want = _definition_on_first_steps(spec, d64, a64, B64, r)
        got = fast.fast_forms(variant)[form](d, a.clone(), B, r)
        if got is None:
            pytest.skip(f"{form} does not run here")
        assert got.shape == (S, batch, r) and got.dtype == dtype
        scale = float(want.abs().max())
        err = float((got.double() - want).abs().max()) / scale
        if dtype == torch.float64:
            assert err <= 1e-12, f"r={r}: {err:.2e}"
        else:
            own = float((_definition_on_first_steps(spec, d, a, B, r).double() - want).abs().max()) / scale
            assert err <= 4 * own + 4 * torch.finfo(dtype).eps, f"r={r}: {err:.2e} vs the definition's {own:.2e}"


def test_first_steps_are_handed_over_once():
    """The scan's first steps have one owner: STM's weights take them (``LayerStats.take_first_steps``) and
    overwrite their Abar; after that the statistics show none, and a second take, through them or a view in
    another dtype, raises instead of reading overwritten buffers. Variants that read none take none; statistics
    made with copies of the buffers are a new owner."""
    stats = _layer_stats(7, 4)
    copies = tuple(FirstSteps(f.delta.clone(), f.Abar.clone(), f.B.clone()) for f in stats.first_steps)
    view = stats.in_dtype(torch.float32)
    fast.ends_weights(stats, 3, 3, "avg")
    fast.ends_weights(stats, 3, 3, "lsq_joint")  # reads u, not the first steps
    assert stats.first_steps is not None and view.first_steps is not None
    first = fast.ends_weights(stats, 3, 3, "lsq")
    assert stats.first_steps is None and view.first_steps is None
    with pytest.raises(RuntimeError, match="taken already"):
        stats.take_first_steps()
    with pytest.raises(RuntimeError, match="taken already"):
        fast.ends_weights(view, 3, 3, "mean")
    again = fast.ends_weights(replace(stats, first_pair=copies), 3, 3, "lsq")
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert LayerStats(stats.forward, stats.backward).take_first_steps() is None
