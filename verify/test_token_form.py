"""Claim 3 (docs/conventions.md §11): the hidden-space input u* of eq. 20 is a per-channel token iff W_j is constant over the state s."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from stm_ref import merge, ssm
from verify.strategies import assert_close_scaled, magnitude, make_problem, problems_with_plans, seeds
from verify.mutations import catches, scaled


def _best_token(Bstar, ustar):
    """Per kept step and channel, the scalar x minimising ||Bbar*_q x - Bbar*_q u*_q||_2 over s, and its residual."""
    target = Bstar * ustar
    den = np.sum(Bstar * Bstar, axis=-1)
    x = np.sum(Bstar * target, axis=-1) / den
    resid = np.linalg.norm(Bstar * x[..., None] - target, axis=-1)
    return x, resid, np.linalg.norm(target, axis=-1)


@given(pp=problems_with_plans(N=1))
def test_with_one_state_the_exact_merge_is_a_token(pp):
    """N = 1: W_j is trivially constant over s, so u*_q = u_q + sum_j W_j u_j is a per-channel token and reproduces h (eq. 18)."""
    prob, plan = pp
    for direction in ("forward", "backward"):
        Astar, Bstar, ustar = merge.exact_merge(prob.Abar, prob.Bbar, prob.u, plan, direction)
        token = ustar[:, :, 0]  # (K, D): a token, not a hidden-space input
        h_star = merge.scan_direction(Astar, Bstar, token, direction)
        h = merge.scan_direction(prob.Abar, prob.Bbar, prob.u, direction)[plan.kept]
        idx = np.flatnonzero(plan.kept <= plan.cls) if direction == "forward" else np.flatnonzero(plan.kept >= plan.cls)
        scale = magnitude(prob.Abar, prob.Bbar, prob.u, direction)[plan.kept]
        assert_close_scaled(h_star[idx], h[idx], scale[idx], what="N=1 token merge")


@given(seed=seeds, L=st.integers(3, 40), D=st.integers(1, 8), N=st.integers(2, 16), method=st.sampled_from(["zoh", "euler"]))
def test_constant_W_over_states_gives_an_exact_token(seed, L, D, N, method):
    """If A is constant over s and B_j is a multiple of B_q, W_j (eq. 20) is constant over s and a token is exact."""
    rng = np.random.default_rng(seed)
    prob = make_problem(seed, L, D, N, method)
    A = np.repeat(prob.A[:, :1], N, axis=1)
    cls = (L - 1) // 2
    plan = merge.merge_plan(L, cls, max(cls - 1, 0), 0)  # left side only, one target
    B = prob.B.copy()
    if len(plan.reduced):
        q = plan.target[0]
        for j in plan.reduced:
            B[j] = rng.uniform(-2, 2) * B[q]
    Abar, Bbar = ssm.discretize(prob.delta, A, B, method)
    W = merge.merge_weights(Abar, Bbar, plan, "forward")
    for w in W.values():
        np.testing.assert_allclose(w, w[:, :1] * np.ones_like(w), rtol=1e-12, atol=1e-300)
    Astar, Bstar, ustar = merge.exact_merge(Abar, Bbar, prob.u, plan, "forward")
    _, resid, size = _best_token(Bstar, ustar)
    assert np.all(resid <= 1e-12 * (size + 1e-300))


@given(seed=seeds, D=st.integers(1, 8), N=st.integers(2, 16))
def test_generic_B_with_several_states_has_no_exact_token(seed, D, N):
    """N > 1, generic B: W_j varies over s, so the least-squares token leaves a residual > 0 and h is not reproduced."""
    rng = np.random.default_rng(seed)
    L = 5
    delta = rng.uniform(0.05, 0.5, (L, D))  # Abar >= e^-1: the merged token's term is not negligible
    A = -rng.uniform(0.1, 2.0, (D, N))
    B = rng.uniform(0.5, 2.0, (L, N)) * np.where(rng.random((L, N)) < 0.5, -1, 1)
    u = rng.uniform(0.5, 1.5, (L, D))
    Abar, Bbar = ssm.discretize(delta, A, B)
    plan = merge.merge_plan(L, 2, 1, 0)  # token 0 merges into token 1
    Astar, Bstar, ustar = merge.exact_merge(Abar, Bbar, u, plan, "forward")
    x, resid, size = _best_token(Bstar, ustar)
    k = int(np.searchsorted(plan.kept, 1))
    assert np.all(resid[k] > 1e-6 * size[k]), "a generic merge has no exact per-channel token"
    h_tok = merge.scan_direction(Astar, Bstar, x, "forward")
    h = ssm.scan(Abar, Bbar, u)
    assert np.max(np.abs(h_tok[k] - h[1])) > 1e-8 * np.max(np.abs(h[1]))


@pytest.mark.parametrize("attr, mutate, prop, what", [
    ("merge_weights", scaled, test_with_one_state_the_exact_merge_is_a_token, "claim 3: the N=1 token"),
])
def test_a_1e9_relative_error_in_the_reference_fails_the_property(attr, mutate, prop, what, monkeypatch):
    """Each property above can fail: merge.<attr> off by a relative 1e-9 must make it fail (verify/mutations.py)."""
    assert catches(prop, merge, attr, mutate, monkeypatch), f"{what} off by 1e-9 went unnoticed"
