"""The batched ``selective_scan`` (mamba-ssm's ``selective_scan_ref`` layout) against the per-channel maths.

The expected value is built along a different path: Euler discretisation by hand, hidden attention
(eq. 5) for the SSM output, then the D skip and the SiLU gate, so a layout slip (transposed B, L and
D swapped, bias added after softplus, gate applied before the skip) shows up as a mismatch.
"""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from stm_ref import ssm
from verify.strategies import draw_A, seeds, signed_loguniform
from verify.mutations import catches, scaled


def _expected(u, delta, A, Bfull, Cfull, D, z, delta_bias, delta_softplus):
    """Per batch item and channel: Euler Abar/Bbar, alpha @ u, + D*u, * silu(z). Bfull, Cfull: (batch, L, D, N)."""
    batch, Dm, L = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = np.log1p(np.exp(np.minimum(delta, 20.0))) * (delta <= 20) + delta * (delta > 20)
    out = np.zeros((batch, Dm, L))
    last = np.zeros((batch, Dm, A.shape[1]))
    for b in range(batch):
        Abar = np.exp(np.einsum("dl,dn->ldn", delta[b], A))
        Bbar = np.einsum("dl,ldn->ldn", delta[b], Bfull[b])
        alpha = ssm.hidden_attention(Abar, Bbar, Cfull[b])
        out[b] = np.einsum("dtj,dj->dt", alpha, u[b])
        last[b] = ssm.scan_closed_form(Abar, Bbar, u[b].T)[-1]
    if D is not None:
        out = out + D[None, :, None] * u
    if z is not None:
        out = out * z / (1 + np.exp(-z))
    return out, last


@st.composite
def scan_args(draw):
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    batch, Dm, N, L = draw(st.integers(1, 3)), draw(st.integers(1, 8)), draw(st.integers(1, 16)), draw(st.integers(1, 64))
    layout = draw(st.sampled_from(["variable", "fixed", "grouped"]))
    u = rng.standard_normal((batch, Dm, L))
    softplus = draw(st.booleans())
    # pre-softplus delta around softplus^-1 of [1e-3, 2]; without softplus it must already be > 0
    delta = rng.uniform(-6.0, 1.5, (batch, Dm, L)) if softplus else np.exp(rng.uniform(np.log(1e-3), np.log(2), (batch, Dm, L)))
    A = draw_A(rng, (Dm, N))
    if layout == "variable":
        B, C = signed_loguniform(rng, (batch, N, L)), signed_loguniform(rng, (batch, N, L))
        Bf, Cf = (np.broadcast_to(M.transpose(0, 2, 1)[:, :, None, :], (batch, L, Dm, N)) for M in (B, C))
    elif layout == "fixed":
        B, C = signed_loguniform(rng, (Dm, N)), signed_loguniform(rng, (Dm, N))
        Bf, Cf = (np.broadcast_to(M[None, None], (batch, L, Dm, N)) for M in (B, C))
    else:
        G = draw(st.sampled_from([g for g in range(1, Dm + 1) if Dm % g == 0]))
        B, C = signed_loguniform(rng, (batch, G, N, L)), signed_loguniform(rng, (batch, G, N, L))
        Bf, Cf = (np.repeat(M.transpose(0, 3, 1, 2), Dm // G, axis=2) for M in (B, C))
    D = rng.standard_normal(Dm) if draw(st.booleans()) else None
    z = rng.standard_normal((batch, Dm, L)) if draw(st.booleans()) else None
    bias = rng.uniform(-1, 1, Dm) if draw(st.booleans()) and softplus else None
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias, delta_softplus=softplus), Bf, Cf


@given(args=scan_args())
def test_selective_scan_matches_attention_form_in_every_layout(args):
    """mamba-ssm semantics: softplus(delta + bias), Euler Abar/Bbar, y = (C·h + D*u) * silu(z), per batch item.

    Both sides are float64 with O(L) operations per output, so rtol 1e-11 relative to the
    absolute-value scale is loose by orders of magnitude yet catches any semantic slip.
    """
    kw, Bf, Cf = args
    y, last = ssm.selective_scan(**kw, return_last_state=True)
    exp_y, exp_last = _expected(kw["u"], kw["delta"], kw["A"], Bf, Cf, kw["D"], kw["z"], kw["delta_bias"], kw["delta_softplus"])
    scale = 1.0 + np.abs(exp_y).max()
    np.testing.assert_allclose(y, exp_y, rtol=1e-11, atol=1e-11 * scale)
    np.testing.assert_allclose(last, exp_last, rtol=1e-11, atol=1e-11 * (1.0 + np.abs(exp_last).max()))
    assert ssm.selective_scan(**kw).shape == kw["u"].shape


def test_softplus_follows_torch_threshold():
    """torch's softplus returns x itself above 20; the reference matches that, not the exact log1p(e^x)."""
    x = np.array([-30.0, -1.0, 0.0, 1.0, 19.9, 20.0, 20.5, 50.0])
    got = ssm.softplus(x)
    assert got[-1] == 50.0 and got[-2] == 20.5
    np.testing.assert_allclose(got[:6], np.log1p(np.exp(x[:6])), rtol=1e-15)


def test_selective_scan_rejects_bad_shapes():
    u = np.zeros((1, 4, 5))
    with pytest.raises(ValueError, match="does not match D"):
        ssm.selective_scan(u, u, -np.ones((3, 2)), np.zeros((1, 2, 5)), np.zeros((1, 2, 5)))
    with pytest.raises(ValueError, match="B of shape"):
        ssm.selective_scan(u, u, -np.ones((4, 2)), np.zeros((1, 3, 5)), np.zeros((1, 2, 5)))
    with pytest.raises(ValueError, match="complex"):
        ssm.selective_scan(u, u, -np.ones((4, 2)) * 1j, np.zeros((1, 2, 5)), np.zeros((1, 2, 5)))


@pytest.mark.parametrize("attr, mutate, prop, what", [
    ("softplus", scaled, test_selective_scan_matches_attention_form_in_every_layout, "the softplus of delta"),
])
def test_a_1e9_relative_error_in_the_reference_fails_the_property(attr, mutate, prop, what, monkeypatch):
    """Each property above can fail: ssm.<attr> off by a relative 1e-9 must make it fail (verify/mutations.py)."""
    assert catches(prop, ssm, attr, mutate, monkeypatch), f"{what} off by 1e-9 went unnoticed"
