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
    assert all(m["p_equiv"] > 0.05 for m in s["per_model"]), "6 images cannot show a difference under 1 point"


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


@pytest.mark.parametrize("models, n", [(1, 4000), (5, 3000)])
def test_resampling_the_counts_of_each_difference_is_scipys_bootstrap_of_the_images(models, n):
    """Accuracy differences take few values, so the bootstrap draws their counts (multinomial) instead of n
    image indices: its distribution of the mean matches scipy.stats.bootstrap's on the same images (mean,
    spread and the 95% percentile interval within Monte-Carlo error of 9,999 resamples)."""
    rng = np.random.default_rng(models)
    a, b = rng.random((models, n)) < 0.8, rng.random((models, n)) < 0.7
    d = ps.image_differences(a, b)
    assert np.unique(d).size <= ps.LATTICE_VALUES
    low, high, dist = ps.cluster_bootstrap(d)
    ref = stats.bootstrap((d,), np.mean, n_resamples=9999, method="percentile", rng=np.random.default_rng(9))
    sd = ref.standard_error
    assert abs(dist.mean() - d.mean()) < 0.05 * sd and np.std(dist) == pytest.approx(sd, rel=0.04)
    assert abs(low - ref.confidence_interval.low) < 0.1 * sd and abs(high - ref.confidence_interval.high) < 0.1 * sd


def test_a_measure_with_many_values_is_bootstrapped_by_scipy_in_batches_of_bounded_memory(monkeypatch):
    """KL and deviation differences are continuous: scipy's bootstrap, holding at most BATCH_ELEMENTS
    resampled values at once, with the interval of the unbatched run within Monte-Carlo error."""
    x = np.random.default_rng(3).normal(size=5000)
    batches = []
    real = stats.bootstrap

    def spy(*args, **kw):
        batches.append(kw["batch"])
        return real(*args, **kw)
    monkeypatch.setattr(ps.stats, "bootstrap", spy)
    low, high, _ = ps.cluster_bootstrap(x)
    assert batches == [ps.BATCH_ELEMENTS // 5000]
    ref = real((x,), np.mean, n_resamples=9999, method="percentile", rng=np.random.default_rng(9)).confidence_interval
    assert low == pytest.approx(ref.low, abs=0.005) and high == pytest.approx(ref.high, abs=0.005)


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
    assert ps.sign_flip_test(np.concatenate([d, np.zeros(5)]), n_models=3) == pytest.approx(full, rel=1e-12)


def test_the_lattice_unit_is_100_over_the_number_of_models():
    """Differences of +-2/3 and +-1 (3 models) on 60 images are on the 100/3 lattice: the exact test, not a
    sampled one whose p-value stops at 1e-4 (the unit was once taken as the smallest |d|, 2/3 here)."""
    d = np.array([200 / 3] * 30 + [100.0] * 25 + [-200 / 3] * 2 + [-100.0] * 3)
    exact = ps.sign_flip_test(d, n_models=3)
    k = np.rint(d * 3 / 100).astype(int)  # the same null distribution by brute convolution of each image's +-k
    dist = {0: 1.0}
    for kk in k:
        nxt = {}
        for v, pv in dist.items():
            for s_ in (kk, -kk):
                nxt[v + s_] = nxt.get(v + s_, 0.0) + pv / 2
        dist = nxt
    want = sum(pv for v, pv in dist.items() if abs(v) >= abs(k.sum()))
    assert exact == pytest.approx(want, rel=1e-9) and exact < 1e-8


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


def test_the_exact_equivalence_test_shows_equivalence_only_inside_the_margin():
    """2000 images per network, 15 lost and 15 gained: each network's exact TOST rejects; a network that
    loses 5% of its hits (4.5 points) does not, and its difference test does."""
    rng = np.random.default_rng(2)
    b = rng.random((3, 2000)) < 0.9
    a = b.copy()
    for m in range(3):  # a loses 15 of b's hits and gains 15 of its misses on each model: no difference
        a[m, rng.choice(np.flatnonzero(b[m]), 15, replace=False)] = False
        a[m, rng.choice(np.flatnonzero(~b[m]), 15, replace=False)] = True
    s = ps.compare(a, b)
    assert all(m["p_equiv"] < 0.05 and (m["n_plus"], m["n_minus"]) == (15, 15) for m in s["per_model"])
    worse = np.where(rng.random((3, 2000)) < 0.05, False, b)  # a loses 5% of b's hits: 4.5 points
    w = ps.compare(worse, b)
    assert all(m["p_equiv"] > 0.5 for m in w["per_model"]) and w["p_diff"] < 1e-6


def _old_bootstrap_tost(d, rng, resamples=2000):
    """The procedure before the exact test: percentile bootstrap of the pooled mean (3 models' d_i per image),
    p = (k + 1) / (B + 1) on each side of the +-1 point margin."""
    values, counts = np.unique(d, return_counts=True)
    means = rng.multinomial(len(d), counts / len(d), size=resamples) @ values / len(d)
    return max((np.sum(means <= -1) + 1) / (resamples + 1), (np.sum(means >= 1) + 1) / (resamples + 1))


def _simulate_equivalence(n, p_plus, p_minus, together, sims, seed=0):
    """(new, old) rejection rates of 'equivalent within 1 point' for 3 networks on n images whose images are
    right only in a with probability p_plus and only in b with p_minus; the networks' discordant images
    are the same ones (together) or drawn independently. New: every network's exact TOST rejects
    (intersection-union); old: the pooled bootstrap TOST."""
    rng, new, old = np.random.default_rng(seed), 0, 0
    for _ in range(sims):
        u = rng.random((1 if together else 3, n))
        k = np.where(u < p_plus, 1, np.where(u < p_plus + p_minus, -1, 0))
        k = np.repeat(k, 3, axis=0) if together else k
        new += max(ps.exact_equivalence_test(int((r == 1).sum()), int((r == -1).sum()), n, 1.0) for r in k) < 0.05
        old += _old_bootstrap_tost(100.0 * k.mean(axis=0), rng) < 0.05
    return new / sims, old / sims


@pytest.mark.parametrize("together", [True, False])
def test_equivalence_size_at_the_margin_is_at_most_alpha_with_few_discordant_images(together):
    """A true difference of exactly +1 point (the margin) at n = 360 with 1-1.4% of images discordant: the
    exact test's rejection rate stays within 5% (+ 2 Monte-Carlo standard errors); the old bootstrap TOST
    rejects far more often when the networks flip together, and above 5% when they flip independently."""
    sims = 1500
    slack = 2 * np.sqrt(0.05 * 0.95 / sims)
    for p_minus in (0.0, 0.002):
        new, old = _simulate_equivalence(360, p_minus + 0.01, p_minus, together, sims)
        assert new <= 0.05 + slack, (p_minus, new)
        if p_minus == 0.0:
            assert old > 0.05 + slack, ("the old procedure was too liberal here", old)


def test_equivalence_power_grows_with_the_images():
    """No true difference, 1% of images discordant each way: with 2000 images per network all three exact
    tests reject in most runs; with 360 images almost never (0.8-point standard error: the margin cannot be
    shown there)."""
    assert _simulate_equivalence(2000, 0.005, 0.005, False, 300)[0] > 0.8
    assert _simulate_equivalence(360, 0.005, 0.005, False, 300)[0] < 0.05


def test_seed_level_statistics_are_the_t_interval_the_t_test_and_statsmodels_tost():
    d = np.array([12.5, 7.2, -9.2])
    s = ps.seed_level(d, margin=1.0)
    low, high = stats.t.interval(0.95, 2, loc=d.mean(), scale=stats.sem(d))
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((low, high)) and s["n_seeds"] == 3
    assert s["p_diff"] == pytest.approx(stats.ttest_1samp(d, 0).pvalue)
    wm = pytest.importorskip("statsmodels.stats.weightstats", reason="statsmodels is not installed")
    d2 = np.array([0.1, 0.3, -0.2, 0.05])
    assert ps.seed_level(d2, 1.0)["p_equiv"] == pytest.approx(wm.ttost_paired(d2, np.zeros(4), -1.0, 1.0)[0])
    assert ps.seed_level([1.0], 1.0)["p_diff"] is None and ps.seed_level([2.0, 2.0], 1.0)["p_equiv"] is None


def test_seed_level_equivalence_size_at_the_margin():
    """Seed differences drawn around a true mean equal to the margin (normal, sd 2 points), 3 and 5 seeds:
    the t-TOST rejects at most 5% of the time (+ 2 Monte-Carlo standard errors)."""
    rng = np.random.default_rng(7)
    for seeds in (3, 5):
        rate = np.mean([ps.seed_level(rng.normal(1.0, 2.0, seeds), 1.0)["p_equiv"] < 0.05 for _ in range(2000)])
        assert rate <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / 2000), (seeds, rate)


def test_reruns_give_identical_numbers():
    rng = np.random.default_rng(5)
    a, b = rng.random((3, 300)) < 0.8, rng.random((3, 300)) < 0.78
    assert ps.compare(a, b) == ps.compare(a, b)


def test_agreement_counts_the_same_top1_on_valid_images():
    assert ps.agreement([1, 2, 3, 4], [1, 2, 0, 4], [True, True, True, False]) == pytest.approx(200 / 3)
    assert ps.agreement([1], [2], [False]) is None
