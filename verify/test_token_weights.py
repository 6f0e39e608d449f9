"""docs/conventions.md §4: the scalar token weights that eq. 11 becomes in the real model, and how tokens are combined."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from stm_ref import merge
from verify.strategies import problems_with_plans, seeds


@given(pp=problems_with_plans())
def test_lsq_weight_is_the_least_squares_fit_of_the_exact_term(pp):
    """lsq: w_j minimises ||w Bbar_q - P_{j->q} Bbar_j||_F, i.e. the residual is orthogonal to Bbar_q (normal equation)."""
    prob, plan = pp
    for direction in ("forward", "backward"):
        w = merge.token_weights(prob.Abar, prob.Bbar, plan, direction, "lsq")
        side = "left" if direction == "forward" else "right"
        for j, q in zip(*plan.reduced_on(side)):
            target = merge.fading_factor(prob.Abar, j, q) * prob.Bbar[j]
            resid = w[int(j)] * prob.Bbar[q] - target
            size = np.linalg.norm(prob.Bbar[q]) * (np.linalg.norm(target) + abs(w[int(j)]) * np.linalg.norm(prob.Bbar[q]))
            assert abs(np.sum(resid * prob.Bbar[q])) <= 1e-12 * size + 1e-300


@given(pp=problems_with_plans(N=1, max_D=1))
def test_scalar_variants_recover_the_exact_weight_when_it_is_a_scalar(pp):
    """D = N = 1: W_j (eq. 20) is one number, and both `lsq` and `mean` return exactly it."""
    prob, plan = pp
    for direction in ("forward", "backward"):
        W = merge.merge_weights(prob.Abar, prob.Bbar, plan, direction)
        for variant in ("lsq", "mean"):
            w = merge.token_weights(prob.Abar, prob.Bbar, plan, direction, variant)
            for j in W:
                np.testing.assert_allclose(w[j], W[j].item(), rtol=1e-12, atol=1e-300)


@given(pp=problems_with_plans(), k=st.sampled_from([-2.0, 1e-3, 3.0, 1e5]))
def test_weights_from_a_rescaled_estimate_are_unchanged(pp, k):
    """Eq. 11 depends on Bbar only through Bbar_j / Bbar_q: lsq, mean and lsq_norm are invariant to Bbar_est = k * Bbar."""
    prob, plan = pp
    for direction in ("forward", "backward"):
        for variant in ("lsq", "mean", "lsq_norm"):
            a = merge.token_weights(prob.Abar, prob.Bbar, plan, direction, variant)
            b = merge.token_weights(prob.Abar, prob.Bbar, plan, direction, variant, Bbar_est=k * prob.Bbar)
            for j in a:
                np.testing.assert_allclose(b[j], a[j], rtol=1e-11, atol=1e-300)


@given(pp=problems_with_plans())
def test_decay_avg_drop_and_norm_weights(pp):
    """decay = mean of P_{j->q}, in (0, 1]; avg = 1; drop = 0; lsq_norm = lsq clamped to [0, 1]."""
    prob, plan = pp
    for direction in ("forward", "backward"):
        get = lambda v: merge.token_weights(prob.Abar, prob.Bbar, plan, direction, v)
        decay, avg, drop, lsq, norm = get("decay"), get("avg"), get("drop"), get("lsq"), get("lsq_norm")
        for j, q in zip(*plan.reduced_on("left" if direction == "forward" else "right")):
            j = int(j)
            np.testing.assert_allclose(decay[j], np.mean(merge.fading_factor(prob.Abar, j, int(q))), rtol=1e-14)
            assert 0 <= decay[j] <= 1 and avg[j] == 1.0 and drop[j] == 0.0
            assert norm[j] == min(max(lsq[j], 0.0), 1.0)


@given(pp=problems_with_plans(), seed=seeds)
def test_merge_tokens_combines_each_group_as_its_variant_says(pp, seed):
    """x*_q = x_q + sum w_j x_j (lsq/mean/decay); normalised variants are convex combinations; drop keeps x_q; order kept."""
    prob, plan = pp
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((plan.L, 5))
    w = {int(j): float(rng.uniform(-1, 2)) for j in plan.reduced}
    groups = {int(k): [] for k in plan.kept}
    for j, q in zip(plan.reduced, plan.target):
        groups[int(q)].append(int(j))
    summed = merge.merge_tokens(x, plan, w, "lsq")
    dropped = merge.merge_tokens(x, plan, w, "drop")
    averaged = merge.merge_tokens(x, plan, {j: 1.0 for j in w}, "avg")
    convex = merge.merge_tokens(x, plan, {j: min(max(v, 0), 1) for j, v in w.items()}, "lsq_norm")
    for i, k in enumerate(plan.kept):
        members = [int(k)] + groups[int(k)]
        np.testing.assert_allclose(summed[i], x[k] + sum(w[j] * x[j] for j in groups[int(k)]), rtol=1e-13, atol=1e-13)
        np.testing.assert_array_equal(dropped[i], x[k])
        np.testing.assert_allclose(averaged[i], x[members].mean(axis=0), rtol=1e-13, atol=1e-13)
        assert np.all(convex[i] <= x[members].max(axis=0) + 1e-12) and np.all(convex[i] >= x[members].min(axis=0) - 1e-12)


def test_mean_weights_clamp_tiny_targets():
    """`mean` clamps |Bbar_q| to clamp * max|Bbar_q| (sign kept), so an exact zero cannot divide."""
    Abar = np.full((2, 1, 2), 0.5)
    Bbar = np.array([[[1.0, 1.0]], [[2.0, 0.0]]])
    plan = merge.merge_plan(3, 2, 1, 0)
    w = merge.token_weights(np.concatenate([Abar, Abar[:1]]), np.concatenate([Bbar, Bbar[:1]]), plan, "forward", "mean", clamp=0.25)
    # terms: 0.5 * 1 / 2 and 0.5 * 1 / (0.25 * 2)
    assert w[0] == pytest.approx(np.mean([0.25, 1.0]))


def test_unknown_variant_is_an_error():
    plan = merge.merge_plan(5, 2, 1, 1)
    with pytest.raises(ValueError, match="variant must be one of"):
        merge.token_weights(np.ones((5, 1, 1)) * 0.5, np.ones((5, 1, 1)), plan, "forward", "median")
    with pytest.raises(ValueError, match="direction"):
        merge.token_weights(np.ones((5, 1, 1)) * 0.5, np.ones((5, 1, 1)), plan, "sideways", "lsq")
