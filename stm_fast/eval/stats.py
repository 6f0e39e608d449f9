"""Paired statistics of two configurations evaluated on the same images (docs/conventions.md §12).

For per-image correctness a, b (0/1): the accuracy difference in percentage points, its paired bootstrap
95% interval (``scipy.stats.bootstrap``, percentile method, resampling images, a fixed seed so that reruns
give identical files), the exact McNemar p-value (``scipy.stats.binomtest`` on the discordant pairs), and a
verdict at 95%: ``supported`` when McNemar rejects equality and a is better, ``contradicted`` when it
rejects and b is better, ``inconclusive`` otherwise.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

__all__ = ["paired_difference", "verdict", "agreement", "SEED", "RESAMPLES"]

SEED = 0
RESAMPLES = 9999
ALPHA = 0.05


def _mean_difference(x, y, axis=-1):
    return 100.0 * (np.mean(x, axis=axis) - np.mean(y, axis=axis))


def _mean_points(d, axis=-1):
    return 100.0 * np.mean(d, axis=axis)


def paired_difference(a, b, seed: int = SEED, n_resamples: int = RESAMPLES) -> dict:
    """{diff, ci_low, ci_high, p_value, n_images, discordant} of accuracy(a) - accuracy(b), in points."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = len(a)
    if n == 0:
        return {"diff": None, "ci_low": None, "ci_high": None, "p_value": None, "n_images": 0, "discordant": 0}
    diff = float(_mean_difference(a, b))
    a_only, b_only = int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))
    if a_only + b_only == 0:  # identical on every image: the difference is exactly 0, nothing to resample
        low = high = 0.0
        p = 1.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=stats.DegenerateDataWarning)
            # resampling images in pairs and taking mean(a) - mean(b) is resampling the per-image differences
            # and taking their mean: the same bootstrap, with one gather instead of an index and two (5x faster)
            res = stats.bootstrap((a - b,), _mean_points, vectorized=True, confidence_level=0.95,
                                  n_resamples=n_resamples, method="percentile", random_state=np.random.default_rng(seed))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        p = float(stats.binomtest(min(a_only, b_only), a_only + b_only, 0.5).pvalue)
    return {"diff": diff, "ci_low": low, "ci_high": high, "p_value": p, "n_images": n, "discordant": a_only + b_only}


def verdict(diff, p_value, alpha: float = ALPHA) -> str:
    """'supported' (a better, significant), 'contradicted' (b better, significant) or 'inconclusive'."""
    if diff is None or p_value is None or p_value >= alpha or diff == 0:
        return "inconclusive"
    return "supported" if diff > 0 else "contradicted"


def agreement(pred, reference, valid) -> float | None:
    """% of the valid images on which two configurations predict the same top-1 class."""
    valid = np.asarray(valid, dtype=bool)
    if not valid.any():
        return None
    return 100.0 * float(np.mean(np.asarray(pred)[valid] == np.asarray(reference)[valid]))
