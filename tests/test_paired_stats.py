"""stm_fast.eval.paired_stats: the cluster bootstrap by image, the exact sign-flip test, TOST and Holm,
each against an independent computation (brute force, scipy's own tests, hand-checked cases)."""

import itertools

import numpy as np
import pytest
from scipy import stats

from stm_fast.eval import paired_stats as ps


def test_identical_configurations_differ_by_exactly_nothing():
    a = np.array([[1, 0, 1, 1, 0, 1], [0, 0, 1, 1, 1, 1]])
    s = ps.compare(a, a)
    assert (s["diff"], s["ci_low"], s["ci_high"], s["p_diff"], s["discordant"]) == (0.0, 0.0, 0.0, 1.0, 0)
    assert s["p_equiv"] == pytest.approx(1 / (ps.RESAMPLES + 1)), "no difference at all is equivalent"


def _brute_force_bootstrap(a, b):
    """Every one of the n**n resamples of image indices, each carrying all models' pairs: the pooled
    accuracy difference over the (models x resampled images) table, in points."""
    n = a.shape[1]
    out = []
    for idx in itertools.product(range(n), repeat=n):
        idx = list(idx)
        out.append(100 * (a[:, idx].mean() - b[:, idx].mean()))
    return np.array(out)


def test_cluster_bootstrap_is_the_brute_force_resampling_of_images():
    """On 3 models x 6 images, the bootstrap distribution of the pooled difference equals the exact one got by
    enumerating all 6**6 index resamples (Kolmogorov distance within Monte-Carlo noise), and its percentile
    interval brackets the exact quantiles."""
    rng = np.random.default_rng(4)
    a = rng.random((3, 6)) < 0.6
    b = rng.random((3, 6)) < 0.5
    exact = _brute_force_bootstrap(a.astype(float), b.astype(float))
    low, high, dist = ps.cluster_bootstrap(ps.image_differences(a, b), n_resamples=40000)
    grid = np.unique(np.round(exact, 9))
    mids = (grid[1:] + grid[:-1]) / 2  # compare the CDFs between lattice points, away from rounding at them
    ks = max(abs(np.mean(exact <= m) - np.mean(dist <= m)) for m in mids)
    assert ks < 0.01
    q = np.quantile(exact, [0.025, 0.975])
    step = np.diff(grid).min()
    assert abs(low - q[0]) <= step + 1e-9 and abs(high - q[1]) <= step + 1e-9


def test_the_cluster_interval_is_wider_than_the_one_that_treats_pairs_as_independent():
    """Three models that agree on the same hard images: resampling the 3 x n pairs independently (the old
    pooled bootstrap) is anti-conservative; resampling images keeps their correlation (about sqrt(3) wider)."""
    rng = np.random.default_rng(0)
    shared = rng.random(300) < 0.15  # the images where a configuration loses, for every model alike
    a = np.tile(~shared, (3, 1))
    b = np.ones((3, 300), dtype=bool)
    low, high, _ = ps.cluster_bootstrap(ps.image_differences(a, b))
    naive = stats.bootstrap(((a.astype(float) - b).ravel() * 100,), np.mean, n_resamples=9999, method="percentile",
                            rng=np.random.default_rng(0)).confidence_interval
    assert (high - low) / (naive.high - naive.low) == pytest.approx(np.sqrt(3), rel=0.15)


@pytest.mark.parametrize("seed", range(4))
def test_the_exact_sign_flip_test_equals_scipys_full_enumeration(seed):
    """Per-image means over 3 models take values k * 100/3; the exact null distribution by convolution gives
    scipy.stats.permutation_test's p-value with every one of its 2**n sign patterns."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 14))
    k = rng.choice([-3, -2, -1, 1, 2, 3], n)
    d = k * 100 / 3
    full = stats.permutation_test((d,), lambda x, axis: np.sum(x, axis=axis), permutation_type="samples",
                                  vectorized=True, n_resamples=2 ** n).pvalue
    assert ps.sign_flip_test(np.concatenate([d, np.zeros(5)])) == pytest.approx(full, rel=1e-12)


def test_with_one_model_the_sign_flip_test_is_mcnemars_exact_test():
    """30 images both right, 10 both wrong: they do not move the p-value; 6 vs 2 discordant pairs do."""
    a = np.array([1] * 30 + [0] * 10 + [1] * 6 + [0] * 2)
    b = np.array([1] * 30 + [0] * 10 + [0] * 6 + [1] * 2)
    s = ps.compare(a, b)
    assert s["discordant"] == 8 and s["n_models"] == 1
    assert s["p_diff"] == pytest.approx(2 * (1 + 8 + 28) / 256)  # two-sided binomial, 2 of 8 on one side
    assert s["p_diff"] == pytest.approx(stats.binomtest(6, 8).pvalue)


def test_values_off_the_lattice_fall_back_to_scipys_permutation_test():
    d = np.array([0.3, -1.1, 2.0, 0.7, 1.3])
    full = stats.permutation_test((d,), lambda x, axis: np.sum(x, axis=axis), permutation_type="samples",
                                  vectorized=True, n_resamples=2 ** 5).pvalue
    assert ps.sign_flip_test(d) == pytest.approx(full)


def test_holm_matches_a_hand_checked_case_and_statsmodels():
    p = [0.01, 0.04, 0.03, None, 0.005]
    # sorted tested p: 0.005 (x4), 0.01 (x3), 0.03 (x2), 0.04 (x1) -> 0.02, 0.03, 0.06, max(0.06, 0.04)
    np.testing.assert_allclose(ps.holm(p), [0.03, 0.06, 0.06, np.nan, 0.02])
    sm = pytest.importorskip("statsmodels.stats.multitest", reason="statsmodels is not installed")
    rng = np.random.default_rng(1)
    q = rng.random(40) ** 3
    np.testing.assert_allclose(ps.holm(q), sm.multipletests(q, method="holm")[1])


def test_tost_supports_equivalence_only_when_the_90_percent_interval_lies_inside_the_margin():
    rng = np.random.default_rng(2)
    b = rng.random((3, 2000)) < 0.9
    a = b.copy()
    for m in range(3):  # a loses 15 of b's hits and gains 15 of its misses on each model: no difference
        a[m, rng.choice(np.flatnonzero(b[m]), 15, replace=False)] = False
        a[m, rng.choice(np.flatnonzero(~b[m]), 15, replace=False)] = True
    s = ps.compare(a, b)
    inside = -ps.MARGIN < s["ci90_low"] and s["ci90_high"] < ps.MARGIN
    assert inside and s["p_equiv"] < 0.05
    worse = np.where(rng.random((3, 2000)) < 0.05, False, b)  # a loses 5% of b's hits: 4.5 points
    assert ps.compare(worse, b)["p_equiv"] > 0.5 and ps.compare(worse, b)["p_diff"] < 1e-6


def test_reruns_give_identical_numbers():
    rng = np.random.default_rng(5)
    a, b = rng.random((3, 300)) < 0.8, rng.random((3, 300)) < 0.78
    assert ps.compare(a, b) == ps.compare(a, b)


def test_agreement_counts_the_same_top1_on_valid_images():
    assert ps.agreement([1, 2, 3, 4], [1, 2, 0, 4], [True, True, True, False]) == pytest.approx(200 / 3)
    assert ps.agreement([1], [2], [False]) is None
