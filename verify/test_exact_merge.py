"""Claim 2 (docs/conventions.md §11): with the true Bbar, the exact merge (eq. 18-21) reproduces h, so the final loss (eq. 9) is 0
and the merging loss (eq. 10) exactly cancels the propagated removal losses (eq. 8)."""

import numpy as np
import pytest
from hypothesis import given

from stm_ref import merge
from verify.strategies import assert_close_scaled, magnitude, problems_with_plans
from verify.mutations import catches, scaled


def _merging_side_positions(plan, direction):
    """Indices into plan.kept where this direction's h must be exact: the merging side and the class token."""
    return np.flatnonzero(plan.kept <= plan.cls) if direction == "forward" else np.flatnonzero(plan.kept >= plan.cls)


@given(pp=problems_with_plans())
def test_exact_merge_reproduces_hidden_states_at_kept_positions(pp):
    """Eq. 18: scanning (Abar*, Bbar*, u*) of eq. 20 gives h*_q = h_q at every kept position of the merging side and cls.

    Per direction; the tolerance is RTOL x the absolute-value scan plus the merged terms' size.
    """
    prob, plan = pp
    for direction in ("forward", "backward"):
        Astar, Bstar, ustar = merge.exact_merge(prob.Abar, prob.Bbar, prob.u, plan, direction)
        assert Astar.shape == Bstar.shape == ustar.shape == (len(plan.kept),) + prob.shape[1:]
        h = merge.scan_direction(prob.Abar, prob.Bbar, prob.u, direction)
        h_star = merge.scan_direction(Astar, Bstar, ustar, direction)
        idx = _merging_side_positions(plan, direction)
        scale = magnitude(prob.Abar, prob.Bbar, prob.u, direction)[plan.kept]
        assert_close_scaled(h_star[idx], h[plan.kept][idx], scale[idx], what=f"{direction} exact merge")


@given(pp=problems_with_plans())
def test_final_loss_is_zero_and_merging_loss_cancels_removal_losses(pp):
    """Eq. 9 = 0 with exact weights; eq. 10: L_M = L_final - sum_j P_{j->q} L_j, so L_M = -sum_j P_{j->q} L_j."""
    prob, plan = pp
    for direction in ("forward", "backward"):
        W = merge.merge_weights(prob.Abar, prob.Bbar, plan, direction)
        idx = _merging_side_positions(plan, direction)
        scale = magnitude(prob.Abar, prob.Bbar, prob.u, direction)[plan.kept][idx]
        final = merge.final_loss(prob.Abar, prob.Bbar, prob.u, plan, direction, W)[idx]
        assert_close_scaled(final, 0.0, scale, what="final loss")
        merging = merge.merging_loss(prob.Abar, prob.Bbar, prob.u, plan, direction, W)[idx]
        # the propagated removal losses, assembled independently from eq. 8 and the decay products
        propagated = np.zeros_like(merging)
        for i, q in enumerate(plan.kept[idx]):
            for j in plan.reduced:
                if (j < q) if direction == "forward" else (j > q):
                    propagated[i] += merge.fading_factor(prob.Abar, j, q) * merge.removal_loss(
                        prob.Abar, prob.Bbar, prob.u, j, direction)
        assert_close_scaled(merging + propagated, 0.0, scale, what="merging + removal")


@given(pp=problems_with_plans())
def test_dropping_tokens_loses_exactly_the_propagated_removal_losses(pp):
    """Eq. 8-10 with no merge (weights 0): final loss = sum_j P_{j->q} Bbar_j u_j and merging loss = 0 (linearity of eq. 3)."""
    prob, plan = pp
    for direction in ("forward", "backward"):
        final = merge.final_loss(prob.Abar, prob.Bbar, prob.u, plan, direction, weights=None)
        expected = np.zeros_like(final)
        for i, q in enumerate(plan.kept):
            for j in plan.reduced:
                if (j < q) if direction == "forward" else (j > q):
                    expected[i] += merge.fading_factor(prob.Abar, j, q) * prob.Bbar[j] * prob.u[j][:, None]
        scale = magnitude(prob.Abar, prob.Bbar, prob.u, direction)[plan.kept]
        assert_close_scaled(final, expected, scale, what="drop final loss")
        merging = merge.merging_loss(prob.Abar, prob.Bbar, prob.u, plan, direction, weights=None)
        assert_close_scaled(merging, 0.0, scale, what="drop merging loss")


@given(pp=problems_with_plans())
def test_removal_loss_is_the_dropped_input_term(pp):
    """Eq. 8: removing token j alone changes h_j by exactly Bbar_j u_j (its decay stays)."""
    prob, plan = pp
    for direction in ("forward", "backward"):
        for j in plan.reduced:
            got = merge.removal_loss(prob.Abar, prob.Bbar, prob.u, j, direction)
            assert_close_scaled(got, prob.Bbar[j] * prob.u[j][:, None],
                                magnitude(prob.Abar, prob.Bbar, prob.u, direction)[j], what="removal loss")


def test_exact_weights_need_a_nonzero_target_bbar():
    Abar = np.full((3, 1, 2), 0.5)
    Bbar = np.ones((3, 1, 2))
    Bbar[1, 0, 1] = 0.0
    plan = merge.merge_plan(3, 2, 1, 0)
    with pytest.raises(ValueError, match="exact zeros"):
        merge.merge_weights(Abar, Bbar, plan, "forward")


@pytest.mark.parametrize("attr, mutate, prop, what", [
    ("merge_weights", scaled, test_exact_merge_reproduces_hidden_states_at_kept_positions, "claim 2: the exact weights"),
    ("_gap_products", scaled, test_final_loss_is_zero_and_merging_loss_cancels_removal_losses, "claim 2: the merged decay"),
])
def test_a_1e9_relative_error_in_the_reference_fails_the_property(attr, mutate, prop, what, monkeypatch):
    """Each property above can fail: merge.<attr> off by a relative 1e-9 must make it fail (verify/mutations.py)."""
    assert catches(prop, merge, attr, mutate, monkeypatch), f"{what} off by 1e-9 went unnoticed"
