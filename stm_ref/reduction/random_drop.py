"""Random token dropping in float64, one image at a time (twin of ``stm_fast.reduction.random_drop``)."""

from __future__ import annotations

import numpy as np

from .base import Twin, kept_state, register_twin

__all__ = ["RandomDrop", "random_drop_step"]


def random_drop_step(k, hidden, residual, state, stats, options):
    """Drop k tokens other than the class token: those ranked lowest by a permutation of the L indices drawn
    from ``np.random.default_rng([seed, L])``; order kept."""
    L = hidden.shape[0]
    priority = np.random.default_rng([options.get("seed", 0), L]).permutation(L)
    others = sorted((t for t in range(L) if t != state["cls"]), key=lambda t: priority[t])
    kept = sorted(set(range(L)) - set(others[:k]))
    return hidden[kept], residual[kept], kept_state(state, kept)


@register_twin
class RandomDrop(Twin):
    name = "random"
    function = staticmethod(random_drop_step)
