"""Paired statistics of two configurations scored on the same images by one or more models (docs/eval.md
§ Statistics): the unit of resampling is the image, whatever the number of models.

For per-image correctness ``a``, ``b`` of shape (models, images) (0/1; one model is shape (1, images)):

* ``diff``: accuracy of a minus accuracy of b in points, pooled over models: the mean over images of the
  per-image difference d_i = mean over models of (a - b), times 100;
* a **cluster bootstrap by image**: image indices resampled with replacement, every model's pair carried
  along, which is the bootstrap of the mean of the d_i (percentile method, a fixed seed so reruns give
  identical files); its 95% interval (``ci_low``, ``ci_high``). Accuracy differences take few values
  (multiples of 100/M), so the resample's counts of each value are drawn from their multinomial, which is
  the same bootstrap at a cost independent of the number of images (at 10,000 images ``scipy.stats.
  bootstrap`` took 1-4 s a call, a few hundred calls a run); other measures use ``scipy.stats.bootstrap``;
* a **sign-flip permutation test** of no difference, two-sided: under the null that a and b are
  exchangeable on every image, flipping the sign of a whole image's d_i (all its models together) is a
  draw from the null, so the shared images are respected. The test is exact: with M models the d_i are
  multiples of 100/M, so the null distribution of their sum is that of sum_j j (2 X_j - c_j) over the
  magnitudes j = 1..M, X_j ~ Binomial(c_j, 1/2) independent (c_j images of magnitude j), formed by
  convolving ``scipy.stats.binom`` pmfs; p = P(|S| >= |s_obs|). scipy's ``permutation_test`` would
  enumerate 2**n sign patterns or sample them (its p-values then stop at 1 / (resamples + 1), which Holm
  multiplies by the family size). With one model this is the two-sided binomial sign test on the
  discordant images, McNemar's exact test (``scipy.stats.binomtest``, which the tests compare with).
  Values off that lattice fall back to ``permutation_test`` with 9,999 random sign patterns;
* an **exact equivalence test** for one network (``exact_equivalence_test``): with one model a paired
  image is +100, 0 or -100 points, so (N+, N-) of n images is trinomial and diff = 100 (p+ - p-). Each of
  the two one-sided nulls (diff >= +margin, diff <= -margin) is tested with the exact unconditional test
  of the statistic N+ - N-: its p-value is the largest tail probability over the nuisance parameter p- on
  the null's boundary p+ - p- = margin / 100 (a grid of 121 values, log- and linearly spaced), so the
  size at the margin is at most alpha for every discordance rate, however few images disagree;
  p_equiv is the larger of the two one-sided p-values. Several networks are combined by intersection-
  union (``claims.py``): equivalent for these networks only if each network's own test rejects. The
  percentile bootstrap TOST used before this test floored at 1/(B+1) when no image disagreed and
  rejected 8-12% of the time at a true difference equal to the margin (tests/test_paired_stats.py
  simulates both);
* a **seed-level t-test** (``seed_level``): one difference per independently trained network, a
  t-interval, a two-sided t-test of no difference and two one-sided t-tests of equivalence; the level at
  which claims about the method, not these networks, are decided;
* ``holm``: Holm's step-down adjustment of a family of p-values (scipy provides BH/BY only).

The verdict of a claim (``claims.py``) is decided by the tests, Holm-adjusted over the run's family; the
intervals describe the size and are not adjusted.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
from scipy import stats

__all__ = ["image_differences", "cluster_bootstrap", "sign_flip_test", "exact_equivalence_test", "seed_level", "holm",
           "compare", "agreement", "SEED", "RESAMPLES", "LATTICE_VALUES", "BATCH_ELEMENTS", "PERMUTATIONS", "MARGIN", "RELATIVE_MARGIN", "ALPHA"]

SEED = 0
RESAMPLES = 9999
PERMUTATIONS = 9999
MARGIN = 1.0  # points: the secondary, absolute equivalence margin
RELATIVE_MARGIN = 0.10  # the primary margin: a tenth of the reduction's own top-1 loss (docs/eval.md)
ALPHA = 0.05
LATTICE_VALUES = 256  # at most this many distinct per-image differences: the bootstrap resamples their counts
BATCH_ELEMENTS = 20_000_000  # else scipy holds at most this many resampled values at once (160 MB of float64)
_EXACT_SIGNS = 16  # up to this many nonzero images, every sign pattern is enumerated


def image_differences(a, b) -> np.ndarray:
    """d_i in points: 100 * mean over models of (a - b) on image i; a, b (models, images) or (images,)."""
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"paired arrays of different shapes {a.shape} and {b.shape}")
    return 100.0 * (a - b).mean(axis=0)


def _mean(d, axis=-1):
    return np.mean(d, axis=axis)


def cluster_bootstrap(d, confidence=0.95, seed: int = SEED, n_resamples: int = RESAMPLES):
    """(low, high, bootstrap distribution) of mean(d) with images (the entries of d) resampled; percentile
    interval. Few distinct d's (accuracy differences): their counts are resampled (``_resampled_means``);
    else ``scipy.stats.bootstrap`` in batches of bounded memory."""
    d = np.asarray(d, dtype=np.float64)
    if d.size == 0:
        return None, None, np.zeros(0)
    if np.all(d == d[0]):  # no variation: every resample has the same mean
        return float(d[0]), float(d[0]), np.full(n_resamples, float(d[0]))
    values, counts = np.unique(d, return_counts=True)
    rng = np.random.default_rng(seed)
    if values.size <= LATTICE_VALUES:
        dist = _resampled_means(values, counts, n_resamples, rng)
        alpha = (1 - confidence) / 2
        low, high = np.quantile(dist, [alpha, 1 - alpha])  # scipy's percentile interval: the same quantiles
        return float(low), float(high), dist
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=stats.DegenerateDataWarning)
        res = stats.bootstrap((d,), _mean, vectorized=True, confidence_level=confidence, n_resamples=n_resamples,
                              method="percentile", rng=rng, batch=max(1, BATCH_ELEMENTS // d.size))
    return float(res.confidence_interval.low), float(res.confidence_interval.high), res.bootstrap_distribution


def _resampled_means(values, counts, n_resamples, rng):
    """The bootstrap distribution of the mean of a sample holding ``counts[k]`` copies of ``values[k]``:
    drawing n entries with replacement puts Multinomial(n, counts / n) of them on the values, so the counts
    are drawn instead of n indices (n_resamples x distinct values, not x n: 10,000 images cost nothing)."""
    n = int(counts.sum())
    drawn = rng.multinomial(n, counts / n, size=n_resamples)
    return drawn @ values / n


def _sum(x, axis=-1):
    return np.sum(x, axis=axis)


def _lattice(nz, unit):
    """The d's as integer multiples of ``unit`` (100 / the number of models), or None when they are not."""
    k = nz / unit
    ki = np.rint(k)
    if np.abs(k - ki).max() > 1e-9 or np.abs(ki).max() > 10_000:
        return None
    return ki.astype(np.int64)


def _exact_sign_flip(k) -> float:
    """P(|S| >= |sum k|) for S = sum_i s_i k_i with independent fair signs s_i (k integer, nonzero)."""
    mags, counts = np.unique(np.abs(k), return_counts=True)
    dist = np.ones(1)  # pmf of S + offset, offset = sum of the magnitudes
    for j, c in zip(mags, counts):
        part = np.zeros(2 * j * c + 1)
        part[::2 * j] = stats.binom.pmf(np.arange(c + 1), c, 0.5)  # j * (2X - c) + j * c, X ~ Binomial(c, 1/2)
        dist = np.convolve(dist, part)
    offset = int(np.sum(np.abs(k)))
    s_obs = abs(int(np.sum(k)))
    values = np.abs(np.arange(dist.size) - offset)
    return float(min(1.0, dist[values >= s_obs].sum()))


def sign_flip_test(d, seed: int = SEED, n_resamples: int = PERMUTATIONS, n_models: int = 1) -> float:
    """Two-sided p-value of the sign-flip permutation test of mean(d) = 0 (see the module docstring); the d's
    of ``n_models`` models are multiples of 100 / n_models points."""
    nz = np.asarray(d, dtype=np.float64)
    nz = nz[nz != 0]  # a zero flips to itself: dropping them leaves the null distribution of the sum unchanged
    if nz.size == 0:
        return 1.0
    k = _lattice(nz, 100.0 / n_models)
    if k is not None:
        return _exact_sign_flip(k)
    res = stats.permutation_test((nz,), _sum, permutation_type="samples", vectorized=True,
                                 n_resamples=2 ** nz.size if nz.size <= _EXACT_SIGNS else n_resamples,
                                 alternative="two-sided", rng=np.random.default_rng(seed))
    return float(min(1.0, res.pvalue))


NUISANCE_GAMMA = 1e-3  # Berger-Boos: the nuisance is searched over its 1 - gamma interval; gamma is added to p


def _tail_at_most(n, z, margin, delta, q):
    """P(Z <= z), Z = (N+ - N- - n margin) / sqrt(max(N+ + N-, 1)), for (N+, N-, rest) ~ Multinomial(n; q +
    delta, q, 1 - 2q - delta), for each q of the array ``q``: the discordant count D ~ Binomial(n, 2q +
    delta) and, given D, N+ ~ Binomial(D, (q + delta) / (2q + delta)); the D within 12 standard deviations
    of their mean are summed (the rest is below 1e-30)."""
    rate = 2 * q + delta
    mean, sd = n * rate, np.sqrt(n * rate * (1 - rate)) + 1
    lo, hi = np.maximum(0, np.floor(mean - 12 * sd)).min(), np.minimum(n, np.ceil(mean + 12 * sd)).max()
    d = np.arange(int(lo), int(hi) + 1)[None, :]
    k = np.floor((z * np.sqrt(np.maximum(d, 1)) + n * margin + d) / 2 + 1e-9)  # the largest N+ with Z <= z
    pi = ((q + delta) / rate)[:, None]
    return (stats.binom.pmf(d, n, rate[:, None]) * stats.binom.cdf(k, d, pi)).sum(axis=1)


def _one_sided_at_margin(n, n_plus, n_minus, delta) -> float:
    """Exact unconditional p-value (Berger-Boos) of the null p+ - p- >= delta against p+ - p- < delta: the
    largest P(Z <= z_obs) over the nuisance p- within the 1 - gamma Clopper-Pearson interval of the
    discordance rate, on the null's boundary and two lines inside it, plus gamma."""
    if delta >= 1:
        return 0.0
    z = (n_plus - n_minus - n * delta) / np.sqrt(max(n_plus + n_minus, 1))
    ci = stats.binomtest(n_plus + n_minus, n).proportion_ci(1 - NUISANCE_GAMMA, method="exact")
    worst = 0.0
    for shift in (1.0, 1.25, 1.5):  # Z is not monotone in N- everywhere: look inside the null too
        dl = delta * shift
        top = (1 - dl) / 2
        q_lo, q_hi = max(0.0, (ci.low - dl) / 2), min(top, (ci.high - dl) / 2)
        if dl >= 1 or q_hi < q_lo:
            continue
        q = np.unique(np.concatenate([np.linspace(q_lo, q_hi, 33), np.geomspace(max(q_lo, 1e-9), max(q_hi, 1e-9), 16)]))
        worst = max(worst, float(_tail_at_most(n, z, delta, dl, q).max()))
    return float(min(1.0, worst + NUISANCE_GAMMA))


@functools.lru_cache(maxsize=65536)
def exact_equivalence_test(n_plus: int, n_minus: int, n: int, margin: float = MARGIN) -> float:
    """TOST p-value that |100 (p+ - p-)| < margin (points) for one network's paired correctness: n_plus images
    right only in a, n_minus right only in b, of n (see the module docstring). 1 for a margin of 0."""
    if n == 0 or margin <= 0:
        return 1.0
    delta = margin / 100.0
    upper = _one_sided_at_margin(n, n_plus, n_minus, delta)  # null: diff >= +margin
    lower = _one_sided_at_margin(n, n_minus, n_plus, delta)  # null: diff <= -margin, by symmetry
    return max(upper, lower)


def seed_level(diffs, margin: float = MARGIN, confidence: float = 0.95) -> dict:
    """Claims about the method: one difference per independently trained network (points). The mean, its
    t-interval, the two-sided t-test of no difference and the TOST p-value of |mean| < margin (two one-sided
    t-tests); p-values None with fewer than two networks or no spread (no variance, no t)."""
    d = np.asarray(diffs, dtype=np.float64)
    out = {"diff": float(d.mean()) if d.size else None, "ci_low": None, "ci_high": None, "p_diff": None,
           "p_equiv": None, "n_seeds": int(d.size)}
    if d.size < 2 or np.all(d == d[0]):
        return out
    se, df = float(d.std(ddof=1) / np.sqrt(d.size)), d.size - 1
    low, high = stats.t.interval(confidence, df, loc=d.mean(), scale=se)
    p_upper = stats.t.cdf((d.mean() - margin) / se, df)  # null: mean >= +margin
    p_lower = stats.t.sf((d.mean() + margin) / se, df)  # null: mean <= -margin
    out.update(ci_low=float(low), ci_high=float(high), p_diff=float(stats.ttest_1samp(d, 0.0).pvalue),
               p_equiv=float(max(p_upper, p_lower)) if margin > 0 else 1.0)
    return out


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the input order: the k-th smallest times (m - k + 1), made
    monotone, capped at 1. None entries stay None (not tested) and do not count in m."""
    p = np.array([np.nan if v is None else v for v in pvalues], dtype=np.float64)
    tested = np.flatnonzero(~np.isnan(p))
    m = tested.size
    out = np.full(p.shape, np.nan)
    if m:
        order = tested[np.argsort(p[tested], kind="stable")]
        scaled = np.minimum(1.0, p[order] * (m - np.arange(m)))
        out[order] = np.maximum.accumulate(scaled)
    return out


def compare(a, b, seed: int = SEED, n_resamples: int = RESAMPLES, margin: float = MARGIN) -> dict:
    """The paired statistics of a vs b, (models, images) 0/1 arrays: the pooled difference with its cluster-
    bootstrap 95% interval (descriptive), the exact sign-flip test of no difference clustered by image
    (``p_diff``), each network's exact McNemar and equivalence p-values (``per_model``), n_images,
    n_models, discordant (images where some model disagrees)."""
    a2, b2 = np.atleast_2d(np.asarray(a)), np.atleast_2d(np.asarray(b))
    d = image_differences(a2, b2)
    n_models = a2.shape[0]
    out = {"diff": None, "ci_low": None, "ci_high": None, "p_diff": None, "n_images": int(d.size),
           "n_models": int(n_models), "discordant": int(np.sum(d != 0)), "per_model": []}
    if d.size == 0:
        return out
    low, high, _ = cluster_bootstrap(d, 0.95, seed, n_resamples)
    out.update(diff=float(d.mean()), ci_low=low, ci_high=high, p_diff=sign_flip_test(d, seed, n_models=n_models))
    for m in range(n_models):
        plus, minus = int(np.sum(a2[m] > b2[m])), int(np.sum(a2[m] < b2[m]))
        out["per_model"].append({"diff": 100.0 * (plus - minus) / d.size, "n_plus": plus, "n_minus": minus,
                                 "p_diff": sign_flip_test(image_differences(a2[m:m + 1], b2[m:m + 1])),
                                 "p_equiv": exact_equivalence_test(plus, minus, int(d.size), float(margin))})
    return out


def agreement(pred, reference, valid) -> float | None:
    """% of the valid images on which two configurations predict the same top-1 class."""
    valid = np.asarray(valid, dtype=bool)
    if not valid.any():
        return None
    return 100.0 * float(np.mean(np.asarray(pred)[valid] == np.asarray(reference)[valid]))
