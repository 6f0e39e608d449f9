"""MTR in float64, one image at a time (twin of ``stm_fast.reduction.mtr``): docs/conventions.md §8."""

from __future__ import annotations

import math

import numpy as np

from .base import Twin, kept_state, register_twin, unit

__all__ = ["MTR", "mtr_importance", "mtr_step"]


def mtr_importance(stats):
    """Per token: mean over channels of Delta (after softplus) of the forward direction plus that of the
    backward direction, both in token position order. (L,)"""
    L = stats["forward"]["delta"].shape[1]
    imp = np.zeros(L)
    for direction in ("forward", "backward"):
        for t in range(L):
            imp[t] += np.mean(stats[direction]["delta"][:, t])
    return imp


def mtr_step(k, hidden, residual, state, stats, options):
    """Rank the patch tokens by importance (ties: lower position first); the k least important are Sources,
    the ceil(keep_frac * (L-1-k)) most important are kept untouched, the rest are Targets. Each Source joins
    the Target of highest cosine similarity of residual + hidden (ties: the first in the ranking); a Target
    becomes the plain mean of itself and its Sources, on both streams. The class token stays; order kept."""
    L = hidden.shape[0]
    cls = state["cls"]
    imp = mtr_importance(stats)
    ranked = sorted((t for t in range(L) if t != cls), key=lambda t: (-imp[t], t))
    keep_n = math.ceil(options.get("keep_frac", 0.5) * (L - 1 - k))
    targets, sources = ranked[keep_n:L - 1 - k], ranked[L - 1 - k:]
    if k and not targets:
        raise ValueError(f"mtr: no Target left to merge {k} of {L} tokens into")
    metric = [unit(v) for v in residual + hidden]
    groups = {q: [q] for q in targets}
    for s in sources:
        sims = [float(metric[s] @ metric[q]) for q in targets]
        groups[targets[int(np.argmax(sims))]].append(s)
    hidden, residual = hidden.copy(), residual.copy()
    for q, members in groups.items():
        hidden[q] = sum(hidden[t] for t in members) / len(members)
        residual[q] = sum(residual[t] for t in members) / len(members)
    kept = [t for t in range(L) if t not in sources]
    return hidden[kept], residual[kept], kept_state(state, kept)


@register_twin
class MTR(Twin):
    name = "mtr"
    function = staticmethod(mtr_step)
