"""Hypothesis strategies for the verification suite: shapes, plans, and SSM values in physical ranges.

Shapes and the knobs that set each value range are drawn by Hypothesis (so it can shrink them);
the arrays themselves come from a NumPy generator seeded by a drawn integer, which keeps drawing
fast for L*D*N up to 64*8*16 and still reproducible from the printed example.

Value ranges (documented once here, used everywhere):

* ``delta`` > 0, log-uniform in [1e-3, 2]: Vim initialises softplus(dt) in [1e-3, 0.1]; trained
  models reach ~1; 2 is a margin.
* ``A`` < 0, -exp(U[log 1e-3, log 20]): Vim initialises A = -(1..16); |A| down to 1e-3 exercises the
  A -> 0 limit of the ZOH formula.
* ``B``, ``C``: both signs, magnitude log-uniform in [1e-4, 4], so near-zero entries (and hence
  large ratios Bbar_j / Bbar_q in eq. 20) occur in most examples.
* ``u``: standard normal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from stm_ref import merge, ssm

MAX_L, MAX_D, MAX_N, MAX_BATCH = 64, 8, 16, 3


def signed_loguniform(rng, shape, lo=1e-4, hi=4.0):
    mag = np.exp(rng.uniform(np.log(lo), np.log(hi), size=shape))
    return np.where(rng.random(shape) < 0.5, -mag, mag)


def draw_delta(rng, shape):
    return np.exp(rng.uniform(np.log(1e-3), np.log(2.0), size=shape))


def draw_A(rng, shape):
    return -np.exp(rng.uniform(np.log(1e-3), np.log(20.0), size=shape))


@dataclass
class SSMProblem:
    """One direction of one layer: raw parameters and their discretisation."""

    delta: np.ndarray  # (L, D)
    A: np.ndarray  # (D, N)
    B: np.ndarray  # (L, N)
    C: np.ndarray  # (L, N)
    u: np.ndarray  # (L, D)
    method: str
    Abar: np.ndarray  # (L, D, N)
    Bbar: np.ndarray  # (L, D, N)

    @property
    def shape(self):
        return self.Abar.shape


def make_problem(seed, L, D, N, method="zoh"):
    rng = np.random.default_rng(seed)
    delta = draw_delta(rng, (L, D))
    A = draw_A(rng, (D, N))
    B = signed_loguniform(rng, (L, N))
    C = signed_loguniform(rng, (L, N))
    u = rng.standard_normal((L, D))
    Abar, Bbar = ssm.discretize(delta, A, B, method=method)
    return SSMProblem(delta, A, B, C, u, method, Abar, Bbar)


seeds = st.integers(min_value=0, max_value=2**32 - 1)
methods = st.sampled_from(["zoh", "euler"])


@st.composite
def problems(draw, min_L=1, max_L=MAX_L, max_D=MAX_D, max_N=MAX_N, N=None):
    L = draw(st.integers(min_L, max_L))
    D = draw(st.integers(1, max_D))
    N = draw(st.integers(1, max_N)) if N is None else N
    return make_problem(draw(seeds), L, D, N, draw(methods))


@st.composite
def plans(draw, L, positions=None, sides=None):
    """A feasible BNNM plan for a sequence of length L >= 1 with the class token in the middle (M // 2)."""
    cls = draw(st.sampled_from([(L - 1) // 2, draw(st.integers(0, L - 1))]))
    n_left, n_right = cls, L - 1 - cls
    sides = draw(st.sampled_from(["both", "left", "right"])) if sides is None else sides
    positions = draw(st.sampled_from(["ends", "uniform"])) if positions is None else positions
    r_left = draw(st.integers(0, max(n_left - 1, 0))) if sides in ("both", "left") else 0
    r_right = draw(st.integers(0, max(n_right - 1, 0))) if sides in ("both", "right") else 0
    return merge.merge_plan(L, cls, r_left, r_right, positions)


@st.composite
def problems_with_plans(draw, min_L=2, max_L=MAX_L, max_D=MAX_D, max_N=MAX_N, N=None, sides=None):
    prob = draw(problems(min_L=min_L, max_L=max_L, max_D=max_D, max_N=max_N, N=N))
    plan = draw(plans(prob.shape[0], sides=sides))
    return prob, plan


def magnitude(Abar, Bbar, u, direction="forward"):
    """Scan of absolute values: bounds the sum of |terms| that make up each h_t (eq. 4).

    Float64 round-off in a length-L scan is at most ~(L+2) * 2^-53 times this, so tolerances
    are stated relative to it.
    """
    return np.abs(merge.scan_direction(np.abs(Abar), np.abs(Bbar), np.abs(u), direction))


# (L + 2) * eps * magnitude bounds the accumulated round-off; L <= 64 gives < 1e-14. 1e-12 leaves
# two orders of margin and still exposes a 1e-9 relative error in any term above 0.1% of the total.
RTOL = 1e-12


def assert_close_scaled(actual, expected, scale, rtol=RTOL, what=""):
    actual, expected, scale = np.asarray(actual), np.asarray(expected), np.asarray(scale)
    err = np.abs(actual - expected)
    bound = rtol * (scale + np.abs(expected)) + 1e-300
    worst = np.max(err / bound) if err.size else 0.0
    assert worst <= 1.0, f"{what}: error {np.max(err):.3e} exceeds {rtol:g} x scale (worst ratio {worst:.3g})"
