"""Paired statistics of two configurations scored on the same images by one or more models (docs/eval.md
§ Statistics): the unit of resampling is the image, whatever the number of models.

For per-image correctness ``a``, ``b`` of shape (models, images) (0/1; one model is shape (1, images)):

* ``diff``: accuracy of a minus accuracy of b in points, pooled over models: the mean over images of the
  per-image difference d_i = mean over models of (a - b), times 100;
* a **cluster bootstrap by image**: image indices resampled with replacement, every model's pair carried
  along, which is the bootstrap of the mean of the d_i (``scipy.stats.bootstrap``, percentile method, a
  fixed seed so reruns give identical files); its 95% interval (``ci_low``, ``ci_high``) and 90% interval;
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
* an **equivalence test** (TOST) with margin ``MARGIN`` = 1 point: the two one-sided nulls diff <= -1 and
  diff >= +1, each rejected by the bootstrap distribution (p = (k + 1) / (B + 1), k the replicates beyond
  the margin); p_equiv is the larger of the two. At 5% it is the same as the 90% interval lying within
  (-1, +1);
* ``holm``: Holm's step-down adjustment of a family of p-values (scipy provides BH/BY only).

The verdict of a claim (``claims.py``) is decided by the tests, Holm-adjusted over the run's family; the
intervals describe the size and are not adjusted.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

__all__ = ["image_differences", "cluster_bootstrap", "sign_flip_test", "equivalence_test", "holm", "compare",
           "agreement", "SEED", "RESAMPLES", "PERMUTATIONS", "MARGIN", "ALPHA"]

SEED = 0
RESAMPLES = 9999
PERMUTATIONS = 9999
MARGIN = 1.0  # points: the equivalence margin
ALPHA = 0.05
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
    """(low, high, bootstrap distribution) of mean(d) with images (the entries of d) resampled."""
    d = np.asarray(d, dtype=np.float64)
    if d.size == 0:
        return None, None, np.zeros(0)
    if np.all(d == d[0]):  # no variation: every resample has the same mean
        return float(d[0]), float(d[0]), np.full(n_resamples, float(d[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=stats.DegenerateDataWarning)
        res = stats.bootstrap((d,), _mean, vectorized=True, confidence_level=confidence, n_resamples=n_resamples,
                              method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high), res.bootstrap_distribution


def _sum(x, axis=-1):
    return np.sum(x, axis=axis)


def _lattice(nz):
    """(integer magnitudes |d| / unit, signs) when the d's are integer multiples of one unit (the smallest
    |d|), else None."""
    unit = np.abs(nz).min()
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


def sign_flip_test(d, seed: int = SEED, n_resamples: int = PERMUTATIONS) -> float:
    """Two-sided p-value of the sign-flip permutation test of mean(d) = 0 (see the module docstring)."""
    nz = np.asarray(d, dtype=np.float64)
    nz = nz[nz != 0]  # a zero flips to itself: dropping them leaves the null distribution of the sum unchanged
    if nz.size == 0:
        return 1.0
    k = _lattice(nz)
    if k is not None:
        return _exact_sign_flip(k)
    res = stats.permutation_test((nz,), _sum, permutation_type="samples", vectorized=True,
                                 n_resamples=2 ** nz.size if nz.size <= _EXACT_SIGNS else n_resamples,
                                 alternative="two-sided", rng=np.random.default_rng(seed))
    return float(min(1.0, res.pvalue))


def equivalence_test(distribution, margin: float = MARGIN) -> float:
    """TOST p-value from a bootstrap distribution of the difference: max over the two one-sided nulls."""
    dist = np.asarray(distribution, dtype=np.float64)
    if dist.size == 0:
        return 1.0
    below = (np.sum(dist <= -margin) + 1) / (dist.size + 1)
    above = (np.sum(dist >= margin) + 1) / (dist.size + 1)
    return float(max(below, above))


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
    """The paired statistics of a vs b (module docstring): diff, ci_low/high (95%), ci90_low/high, p_diff,
    p_equiv, n_images, n_models, discordant (images where some model disagrees)."""
    d = image_differences(a, b)
    n_models = np.atleast_2d(np.asarray(a)).shape[0]
    if d.size == 0:
        return {"diff": None, "ci_low": None, "ci_high": None, "ci90_low": None, "ci90_high": None, "p_diff": None,
                "p_equiv": None, "n_images": 0, "n_models": n_models, "discordant": 0}
    low, high, dist = cluster_bootstrap(d, 0.95, seed, n_resamples)
    low90, high90 = (float(q) for q in np.percentile(dist, [5, 95]))
    return {"diff": float(d.mean()), "ci_low": low, "ci_high": high, "ci90_low": low90, "ci90_high": high90,
            "p_diff": sign_flip_test(d, seed), "p_equiv": equivalence_test(dist, margin), "n_images": int(d.size),
            "n_models": int(n_models), "discordant": int(np.sum(d != 0))}


def agreement(pred, reference, valid) -> float | None:
    """% of the valid images on which two configurations predict the same top-1 class."""
    valid = np.asarray(valid, dtype=bool)
    if not valid.any():
        return None
    return 100.0 * float(np.mean(np.asarray(pred)[valid] == np.asarray(reference)[valid]))
