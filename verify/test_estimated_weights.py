"""Claim 4 (docs/conventions.md §11): merging with estimated (previous-layer) Bbar, eq. 11, has an exactly known, bounded loss."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from stm_ref import merge
from verify.strategies import assert_close_scaled, magnitude, problems, seeds
from verify.mutations import catches, scaled


def _est_weights(Abar, Bbar_est, plan, direction):
    """West_j = P_{j->q} * Bbar_est_j / Bbar_est_q, P from the true Abar (eq. 11)."""
    out = {}
    for j, q in zip(*plan.reduced_on("left" if direction == "forward" else "right")):
        out[int(j)] = merge.fading_factor(Abar, int(j), int(q)) * Bbar_est[j] / Bbar_est[q]
    return out


@st.composite
def ends_cases(draw):
    prob = draw(problems(min_L=3))
    L = prob.shape[0]
    cls = (L - 1) // 2
    plan = merge.merge_plan(L, cls, draw(st.integers(0, max(cls - 1, 0))), draw(st.integers(0, max(L - cls - 2, 0))), "ends")
    rng = np.random.default_rng(draw(seeds))
    noise = rng.uniform(0.5, 1.5, prob.Bbar.shape) * np.where(rng.random(prob.Bbar.shape) < 0.1, -1, 1)
    return prob, plan, prob.Bbar * noise


@given(case=ends_cases())
def test_loss_at_merge_point_is_the_weight_error_times_the_input(case):
    """With West from Bbar_est: L_q = sum_j Bbar_q (W_j - West_j) u_j elementwise and exactly, hence |L_q| <= sum |Bbar_q||W_j - West_j||u_j|."""
    prob, plan, Bbar_est = case
    for direction in ("forward", "backward"):
        W = merge.merge_weights(prob.Abar, prob.Bbar, plan, direction)
        West = _est_weights(prob.Abar, Bbar_est, plan, direction)
        loss = merge.final_loss(prob.Abar, prob.Bbar, prob.u, plan, direction, West)
        index = {int(k): i for i, k in enumerate(plan.kept)}
        side = "left" if direction == "forward" else "right"
        for q, js in plan.groups(side).items():
            predicted = sum(prob.Bbar[q] * (W[j] - West[j]) * prob.u[j][:, None] for j in js)
            bound = sum(np.abs(prob.Bbar[q]) * np.abs(W[j] - West[j]) * np.abs(prob.u[j])[:, None] for j in js)
            scale = magnitude(prob.Abar, prob.Bbar, prob.u, direction)[q] + bound
            assert_close_scaled(loss[index[q]], predicted, scale, what="merge-point loss")
            assert np.all(np.abs(loss[index[q]]) <= bound + 1e-12 * scale)


@given(case=ends_cases(), k=st.sampled_from([-3.0, -1.0, 1e-3, 0.5, 7.0, 1e6]))
def test_a_rescaled_estimate_loses_nothing(case, k):
    """Eq. 11's ratio Bbar_j / Bbar_q is scale-free: Bbar_est = k * Bbar (any k != 0) gives zero loss at every kept position."""
    prob, plan, _ = case
    for direction in ("forward", "backward"):
        West = _est_weights(prob.Abar, k * prob.Bbar, plan, direction)
        loss = merge.final_loss(prob.Abar, prob.Bbar, prob.u, plan, direction, West)
        idx = np.flatnonzero(plan.kept <= plan.cls) if direction == "forward" else np.flatnonzero(plan.kept >= plan.cls)
        scale = magnitude(prob.Abar, prob.Bbar, prob.u, direction)[plan.kept]
        assert_close_scaled(loss[idx], 0.0, scale[idx], what="rescaled estimate")


@given(case=ends_cases())
def test_loss_vanishes_continuously_as_the_estimate_converges(case):
    """Bbar_est = Bbar (1 + eps*noise): the merge-point loss is O(eps) and -> 0 as eps -> 0 (continuity of eq. 11)."""
    prob, plan, Bbar_est = case
    noise = Bbar_est / prob.Bbar - 1.0  # relative noise in [-2.5, 0.5]
    for direction in ("forward", "backward"):
        sizes = []
        for eps in (1e-2, 1e-4, 1e-6):
            West = _est_weights(prob.Abar, prob.Bbar * (1 + eps * noise), plan, direction)
            sizes.append(np.max(np.abs(merge.final_loss(prob.Abar, prob.Bbar, prob.u, plan, direction, West))))
        scale = np.max(magnitude(prob.Abar, prob.Bbar, prob.u, direction)) + 1e-300
        # linear convergence: each 100x smaller eps gives a >= ~50x smaller loss, until round-off
        assert sizes[1] <= sizes[0] / 50 + 1e-11 * scale
        assert sizes[2] <= sizes[1] / 50 + 1e-11 * scale


@pytest.mark.parametrize("attr, mutate, prop, what", [
    ("merged_states", scaled, test_loss_at_merge_point_is_the_weight_error_times_the_input, "claim 4: the merged states"),
])
def test_a_1e9_relative_error_in_the_reference_fails_the_property(attr, mutate, prop, what, monkeypatch):
    """Each property above can fail: merge.<attr> off by a relative 1e-9 must make it fail (verify/mutations.py)."""
    assert catches(prop, merge, attr, mutate, monkeypatch), f"{what} off by 1e-9 went unnoticed"
