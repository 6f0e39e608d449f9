"""Claim 6 (docs/conventions.md §11): both directions. Exact merges keep the class-token state in both; the class loss is their sum (eq. 9)."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from stm_ref import merge
from verify.strategies import assert_close_scaled, magnitude, make_problem, plans, seeds
from verify.mutations import catches, scaled_in


@st.composite
def two_directions(draw):
    L, D, N = draw(st.integers(3, 64)), draw(st.integers(1, 8)), draw(st.integers(1, 16))
    method = draw(st.sampled_from(["zoh", "euler"]))
    fwd = make_problem(draw(seeds), L, D, N, method)  # each direction has its own conv, x_proj, dt_proj, A
    bwd = make_problem(draw(seeds), L, D, N, method)
    plan = draw(plans(L, sides="both"))
    return fwd, bwd, plan


@given(case=two_directions())
def test_exact_merges_preserve_the_class_token_in_both_directions(case):
    """Eq. 18 in both directions under `both`: forward h at cls (left merges) and backward h at cls (right merges) are exact."""
    fwd, bwd, plan = case
    for prob, direction in ((fwd, "forward"), (bwd, "backward")):
        Astar, Bstar, ustar = merge.exact_merge(prob.Abar, prob.Bbar, prob.u, plan, direction)
        h_cls = merge.scan_direction(Astar, Bstar, ustar, direction)[plan.new_cls]
        ref = merge.scan_direction(prob.Abar, prob.Bbar, prob.u, direction)[plan.cls]
        assert_close_scaled(h_cls, ref, magnitude(prob.Abar, prob.Bbar, prob.u, direction)[plan.cls], what=direction)


@given(case=two_directions(), seed=seeds)
def test_class_loss_is_the_sum_of_each_sides_own_direction(case, seed):
    """Eq. 9: L_cls = sum over directions; each direction's class loss comes only from its own side's merges.

    With estimated (perturbed) Bbar: the forward class loss under `both` equals that of the left-only plan,
    the backward one that of the right-only plan, and the eq. 9 total is their sum.
    """
    fwd, bwd, plan = case
    rng = np.random.default_rng(seed)
    left_only = merge.merge_plan(plan.L, plan.cls, int(np.sum(plan.reduced < plan.cls)), 0, "ends")
    right_only = merge.merge_plan(plan.L, plan.cls, 0, int(np.sum(plan.reduced > plan.cls)), "ends")
    both = merge.merge_plan(plan.L, plan.cls, int(np.sum(plan.reduced < plan.cls)), int(np.sum(plan.reduced > plan.cls)), "ends")
    for prob, direction, own in ((fwd, "forward", left_only), (bwd, "backward", right_only)):
        est = prob.Bbar * rng.uniform(0.5, 1.5, prob.Bbar.shape)
        w_both = merge.token_weights(prob.Abar, prob.Bbar, both, direction, "lsq", Bbar_est=est)
        w_own = merge.token_weights(prob.Abar, prob.Bbar, own, direction, "lsq", Bbar_est=est)
        l_both = merge.final_loss(prob.Abar, prob.Bbar, prob.u, both, direction, w_both)[both.new_cls]
        l_own = merge.final_loss(prob.Abar, prob.Bbar, prob.u, own, direction, w_own)[own.new_cls]
        scale = magnitude(prob.Abar, prob.Bbar, prob.u, direction)[plan.cls]
        assert_close_scaled(l_both, l_own, scale, what=f"{direction} class loss")


@pytest.mark.parametrize("attr, mutate, prop, what", [
    ("merge_weights", scaled_in("backward"), test_exact_merges_preserve_the_class_token_in_both_directions, "claim 6: the backward weights"),
])
def test_a_1e9_relative_error_in_the_reference_fails_the_property(attr, mutate, prop, what, monkeypatch):
    """Each property above can fail: merge.<attr> off by a relative 1e-9 must make it fail (verify/mutations.py)."""
    assert catches(prop, merge, attr, mutate, monkeypatch), f"{what} off by 1e-9 went unnoticed"
