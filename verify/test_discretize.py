"""Discretisation (eq. 2): ZOH against SciPy, its limits, and the Euler rule Mamba's kernels use."""

import numpy as np
import pytest
from hypothesis import given, strategies as st
from scipy.signal import cont2discrete

from stm_ref import ssm
from verify.strategies import draw_A, draw_delta, seeds, signed_loguniform
from verify.mutations import catches, scaled


@given(seed=seeds, L=st.integers(1, 6), D=st.integers(1, 4), N=st.integers(1, 4))
def test_zoh_matches_scipy_cont2discrete(seed, L, D, N):
    """Eq. 2: Abar = exp(delta*A), Bbar = (delta*A)^-1 (exp(delta*A) - I) delta*B equals SciPy's ZOH.

    SciPy discretises each scalar system x' = a x + b u through a matrix exponential, an independent
    algorithm; both are accurate to a few ulps, so rtol 1e-12 is safe.
    """
    rng = np.random.default_rng(seed)
    delta, A, B = draw_delta(rng, (L, D)), draw_A(rng, (D, N)), signed_loguniform(rng, (L, N))
    Abar, Bbar = ssm.discretize(delta, A, B, "zoh")
    for t in range(L):
        for d in range(D):
            for s in range(N):
                Ad, Bd, *_ = cont2discrete((np.array([[A[d, s]]]), np.array([[B[t, s]]]), np.eye(1), np.zeros((1, 1))), delta[t, d], method="zoh")
                np.testing.assert_allclose(Abar[t, d, s], Ad[0, 0], rtol=1e-12)
                np.testing.assert_allclose(Bbar[t, d, s], Bd[0, 0], rtol=1e-12, atol=1e-300)


@given(seed=seeds, L=st.integers(1, 16), D=st.integers(1, 8), N=st.integers(1, 16))
def test_zoh_minus_euler_is_second_order_in_delta(seed, L, D, N):
    """Eq. 2 vs Euler: |Bbar_zoh - delta*B| <= |A| |B| delta^2 / 2 for A <= 0 (exact Taylor bound), so ZOH -> Euler to first order.

    With z = delta*A <= 0, Bbar_zoh = delta*B*phi(z), phi(z) = (e^z - 1)/z, and |phi(z) - 1| <= |z|/2.
    Both schemes also share Abar = exp(delta*A). The 1e-12 slack is round-off on O(delta*|B|) values.
    """
    rng = np.random.default_rng(seed)
    delta, A, B = draw_delta(rng, (L, D)), draw_A(rng, (D, N)), signed_loguniform(rng, (L, N))
    Az, Bz = ssm.discretize(delta, A, B, "zoh")
    Ae, Be = ssm.discretize(delta, A, B, "euler")
    np.testing.assert_array_equal(Az, Ae)
    np.testing.assert_array_equal(Be, delta[:, :, None] * B[:, None, :])
    bound = 0.5 * np.abs(A)[None] * np.abs(B)[:, None, :] * delta[:, :, None] ** 2
    slack = 1e-12 * np.abs(Be)
    assert np.all(np.abs(Bz - Be) <= bound + slack)
    # and the bound is attained to leading order: the ratio tends to 1 as delta -> 0
    small = ssm.discretize(delta * 1e-6, A, B, "zoh")[1] - ssm.discretize(delta * 1e-6, A, B, "euler")[1]
    lead = 0.5 * A[None] * B[:, None, :] * (delta[:, :, None] * 1e-6) ** 2
    np.testing.assert_allclose(small, lead, rtol=1e-3, atol=1e-30)


@given(seed=seeds, L=st.integers(1, 16), D=st.integers(1, 8), N=st.integers(1, 16),
       tiny=st.sampled_from([0.0, 1e-300, 1e-200, 1e-30, 1e-12]))
def test_zoh_with_A_to_zero_gives_delta_B(seed, L, D, N, tiny):
    """Eq. 2 with A -> 0: Abar -> 1 and Bbar -> delta*B, with no 0/0 (the A = 0 limit of (e^{dA}-1)/A)."""
    rng = np.random.default_rng(seed)
    delta, B = draw_delta(rng, (L, D)), signed_loguniform(rng, (L, N))
    A = -tiny * np.ones((D, N))
    Abar, Bbar = ssm.discretize(delta, A, B, "zoh")
    assert np.all(np.isfinite(Bbar))
    np.testing.assert_allclose(Bbar, delta[:, :, None] * B[:, None, :], rtol=1e-11, atol=0)
    np.testing.assert_allclose(Abar, 1.0, rtol=1e-11)


@given(seed=seeds, L=st.integers(1, 32), D=st.integers(1, 8), N=st.integers(1, 16))
def test_decay_is_contractive_for_negative_A(seed, L, D, N):
    """A < 0 and delta > 0 give 0 < Abar < 1 (eq. 2), the fact distance fading (eq. 12-13) rests on."""
    rng = np.random.default_rng(seed)
    Abar, _ = ssm.discretize(draw_delta(rng, (L, D)), draw_A(rng, (D, N)), signed_loguniform(rng, (L, N)))
    assert np.all(Abar > 0) and np.all(Abar < 1)


def test_discretize_rejects_bad_input():
    with pytest.raises(ValueError, match="method"):
        ssm.discretize(np.ones((2, 1)), -np.ones((1, 1)), np.ones((2, 1)), method="bilinear")
    with pytest.raises(ValueError, match="B must be"):
        ssm.discretize(np.ones((3, 2)), -np.ones((2, 4)), np.ones((5, 4)))
    with pytest.raises(ValueError, match="complex"):
        ssm.discretize(np.ones((3, 2)), -np.ones((2, 4)) * (1 + 1j), np.ones((3, 4)))


@pytest.mark.parametrize("attr, mutate, prop, what", [
    ("_phi1", scaled, test_zoh_matches_scipy_cont2discrete, "eq. 2: the ZOH factor"),
])
def test_a_1e9_relative_error_in_the_reference_fails_the_property(attr, mutate, prop, what, monkeypatch):
    """Each property above can fail: ssm.<attr> off by a relative 1e-9 must make it fail (verify/mutations.py)."""
    assert catches(prop, ssm, attr, mutate, monkeypatch), f"{what} off by 1e-9 went unnoticed"
