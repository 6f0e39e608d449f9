"""Speed of the float64 reference (it is an oracle, not a fast path: this tracks that it stays usable in tests)."""

import numpy as np

from stm_ref import merge, ssm


def _problem(L=64, D=8, N=16, seed=0):
    rng = np.random.default_rng(seed)
    delta = rng.uniform(1e-3, 0.5, (L, D))
    A = -rng.uniform(0.5, 16, (D, N))
    B = rng.standard_normal((L, N))
    return ssm.discretize(delta, A, B), rng.standard_normal((L, D))


def test_reference_scan(benchmark):
    (Abar, Bbar), u = _problem()
    h = benchmark(ssm.scan, Abar, Bbar, u)
    assert h.shape == Abar.shape


def test_reference_exact_merge(benchmark):
    (Abar, Bbar), u = _problem()
    plan = merge.merge_plan(64, 32, 8, 8)
    Astar, Bstar, ustar = benchmark(merge.exact_merge, Abar, Bbar, u, plan, "forward")
    assert Astar.shape[0] == len(plan.kept)
