"""Claim 5 (docs/conventions.md §11): distance fading, eq. 12-13 and 22-24: a loss only ever decays after its last perturbation."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from stm_ref import merge
from verify.strategies import assert_close_scaled, magnitude, problems, seeds
from verify.mutations import catches, scaled


@st.composite
def perturbed(draw):
    prob = draw(problems(min_L=2))
    L = prob.shape[0]
    p = draw(st.integers(0, L - 2))
    direction = draw(st.sampled_from(["forward", "backward"]))
    rng = np.random.default_rng(draw(seeds))
    u2 = prob.u.copy()
    # perturb every input the scan sees up to p; later inputs stay identical
    if direction == "forward":
        u2[: p + 1] += rng.standard_normal(u2[: p + 1].shape)
    else:
        p = L - 1 - p
        u2[p:] += rng.standard_normal(u2[p:].shape)
    return prob, p, direction, u2


@given(case=perturbed())
def test_loss_after_the_last_perturbation_is_the_decayed_loss(case):
    """Eq. 24: L_t = (prod_{n=p+1..t} Abar_n) L_p exactly for every t after p in scan order."""
    prob, p, direction, u2 = case
    h = merge.scan_direction(prob.Abar, prob.Bbar, prob.u, direction)
    h2 = merge.scan_direction(prob.Abar, prob.Bbar, u2, direction)
    loss = h - h2
    later = range(p + 1, prob.shape[0]) if direction == "forward" else range(p - 1, -1, -1)
    scale = magnitude(prob.Abar, prob.Bbar, prob.u, direction) + magnitude(prob.Abar, prob.Bbar, u2, direction)
    for t in later:
        assert_close_scaled(loss[t], merge.fading_factor(prob.Abar, p, t) * loss[p], scale[t], what=f"fading to {t}")


@given(case=perturbed())
def test_loss_never_grows_and_is_bounded_by_the_largest_decay(case):
    """Eq. 13 as a bound: |L_t| <= (max Abar)^|t-p| |L_p|, and |L_t| is non-increasing in scan order (0 < Abar < 1)."""
    prob, p, direction, u2 = case
    loss = np.abs(merge.scan_direction(prob.Abar, prob.Bbar, prob.u, direction)
                  - merge.scan_direction(prob.Abar, prob.Bbar, u2, direction))
    later = list(range(p + 1, prob.shape[0])) if direction == "forward" else list(range(p - 1, -1, -1))
    scale = magnitude(prob.Abar, prob.Bbar, prob.u, direction) + magnitude(prob.Abar, prob.Bbar, u2, direction)
    prev = loss[p]
    for t in later:
        steps = prob.Abar[p + 1 : t + 1] if direction == "forward" else prob.Abar[t:p]
        amax = steps.max(axis=0)
        assert np.all(loss[t] <= amax ** abs(t - p) * loss[p] + 1e-12 * scale[t])
        assert np.all(loss[t] <= prev + 1e-12 * scale[t])
        prev = loss[t]


@given(prob=problems(min_L=5), seed=seeds)
def test_merge_loss_reaches_the_class_token_faded(prob, seed):
    """Eq. 13 for an estimated merge (`ends` plan): L_cls = P_{q->cls} L_q, the merge point's loss faded over the distance."""
    L = prob.shape[0]
    cls = (L - 1) // 2
    plan = merge.merge_plan(L, cls, max(cls - 1, 0), max(L - cls - 2, 0), "ends")
    rng = np.random.default_rng(seed)
    est = prob.Bbar * rng.uniform(0.5, 1.5, prob.Bbar.shape)
    for direction, side in (("forward", "left"), ("backward", "right")):
        W = merge.token_weights(prob.Abar, prob.Bbar, plan, direction, "lsq", Bbar_est=est)
        loss = merge.final_loss(prob.Abar, prob.Bbar, prob.u, plan, direction, W)
        for q in plan.groups(side):
            iq = int(np.searchsorted(plan.kept, q))
            scale = magnitude(prob.Abar, prob.Bbar, prob.u, direction)[cls] + np.abs(loss[iq])
            assert_close_scaled(loss[plan.new_cls], merge.fading_factor(prob.Abar, q, cls) * loss[iq], scale,
                                what="class-token loss")


@pytest.mark.parametrize("attr, mutate, prop, what", [
    ("fading_factor", scaled, test_loss_after_the_last_perturbation_is_the_decayed_loss, "claim 5: the fading factor"),
])
def test_a_1e9_relative_error_in_the_reference_fails_the_property(attr, mutate, prop, what, monkeypatch):
    """Each property above can fail: merge.<attr> off by a relative 1e-9 must make it fail (verify/mutations.py)."""
    assert catches(prop, merge, attr, mutate, monkeypatch), f"{what} off by 1e-9 went unnoticed"
