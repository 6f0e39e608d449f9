"""Claim 1 (docs/conventions.md §11): recurrence (eq. 3) = closed form (eq. 4) = hidden attention (eq. 5)."""

import numpy as np
import pytest
from hypothesis import given, strategies as st
from scipy.signal import lfilter

from stm_ref import ssm
from verify.strategies import assert_close_scaled, magnitude, problems, seeds
from verify.mutations import catches, scaled


@given(prob=problems())
def test_recurrence_equals_closed_form(prob):
    """Eq. 3 = eq. 4: the step-by-step scan and the explicit sum of decayed inputs give the same h."""
    h = ssm.scan(prob.Abar, prob.Bbar, prob.u)
    h_closed = ssm.scan_closed_form(prob.Abar, prob.Bbar, prob.u)
    assert_close_scaled(h, h_closed, magnitude(prob.Abar, prob.Bbar, prob.u), what="scan vs closed form")


@given(prob=problems())
def test_hidden_attention_reproduces_outputs(prob):
    """Eq. 5: y[:, d] = alpha[d] @ u[:, d] with alpha[d,t,j] = sum_s C_t (prod Abar) Bbar_j, and alpha is causal."""
    h = ssm.scan(prob.Abar, prob.Bbar, prob.u)
    y = ssm.readout(h, prob.C)
    alpha = ssm.hidden_attention(prob.Abar, prob.Bbar, prob.C)
    y_attn = np.einsum("dtj,jd->td", alpha, prob.u)
    scale = ssm.readout(magnitude(prob.Abar, prob.Bbar, prob.u), np.abs(prob.C))
    assert_close_scaled(y_attn, y, scale, what="hidden attention vs scan")
    L = prob.shape[0]
    assert np.all(alpha[:, np.triu_indices(L, 1)[0], np.triu_indices(L, 1)[1]] == 0)


@given(seed=seeds, L=st.integers(1, 64), a=st.floats(1e-6, 1 - 1e-6), b=st.floats(-4, 4))
def test_time_invariant_scan_matches_scipy_lfilter(seed, L, a, b):
    """Eq. 3 with constant Abar = a, Bbar = b is the IIR filter h_t = a h_{t-1} + b u_t (SciPy's lfilter)."""
    u = np.random.default_rng(seed).standard_normal((L, 1))
    h = ssm.scan(np.full((L, 1, 1), a), np.full((L, 1, 1), b), u)[:, 0, 0]
    ref = lfilter([b], [1.0, -a], u[:, 0])
    scale = lfilter([abs(b)], [1.0, -a], np.abs(u[:, 0]))
    assert_close_scaled(h, ref, scale, what="scan vs lfilter")


@given(prob=problems(max_L=16))
def test_initial_state_decays_through_the_scan(prob):
    """Eq. 3 from h_{-1} = h0: h_t = scan from 0 + (prod_{k<=t} Abar_k) h0 (linearity of the recurrence)."""
    rng = np.random.default_rng(0)
    h0 = rng.standard_normal(prob.shape[1:])
    h = ssm.scan(prob.Abar, prob.Bbar, prob.u, h0=h0)
    base = ssm.scan(prob.Abar, prob.Bbar, prob.u)
    carried = np.cumprod(prob.Abar, axis=0) * h0
    assert_close_scaled(h, base + carried, magnitude(prob.Abar, prob.Bbar, prob.u) + np.abs(h0), what="h0")


@pytest.mark.parametrize("attr, mutate, prop, what", [
    ("scan", scaled, test_recurrence_equals_closed_form, "claim 1: the scan"),
    ("hidden_attention", scaled, test_hidden_attention_reproduces_outputs, "claim 1: the attention form"),
])
def test_a_1e9_relative_error_in_the_reference_fails_the_property(attr, mutate, prop, what, monkeypatch):
    """Each property above can fail: ssm.<attr> off by a relative 1e-9 must make it fail (verify/mutations.py)."""
    assert catches(prop, ssm, attr, mutate, monkeypatch), f"{what} off by 1e-9 went unnoticed"
