"""ToMe in float64, one image at a time (twin of ``stm_fast.reduction.tome``): docs/conventions.md §8."""

from __future__ import annotations

import numpy as np

from .base import Twin, kept_state, register_twin, unit

__all__ = ["ToMe", "tome_step"]


def tome_step(k, hidden, residual, state, stats, options):
    """ToMe: bipartite soft matching on alternating tokens, the k best-matched even tokens merged.

    Sources are the tokens at even indices of the current sequence, destinations those at odd indices; the
    class token is neither. Each source's best destination is the one of highest cosine similarity of the
    next block's input (residual + hidden); the k sources with the highest best similarity merge into their
    destination by size-weighted average (sizes add up), on both streams. Order is kept.
    """
    L = hidden.shape[0]
    cls = state["cls"]
    x = residual + hidden
    metric = [unit(x[t]) for t in range(L)]
    sources = [t for t in range(0, L, 2) if t != cls]
    dests = [t for t in range(1, L, 2) if t != cls]
    if k > len(sources):
        raise ValueError(f"tome: cannot merge {k} tokens: only {len(sources)} sources among {L} tokens")
    if not dests:
        raise ValueError(f"tome: no destination token among {L} tokens (class token at {cls})")
    best_sim, best_dst = {}, {}
    for a in sources:
        sims = [float(metric[a] @ metric[b]) for b in dests]
        j = int(np.argmax(sims))  # first of equal maxima (random data has none)
        best_sim[a], best_dst[a] = sims[j], dests[j]
    chosen = sorted(sources, key=lambda a: -best_sim[a])[:k]  # stable: ties keep index order
    size = state["size"].astype(np.float64).copy()
    new_hidden, new_residual, new_size = hidden.copy(), residual.copy(), size.copy()
    for b in dests:
        group = [b] + [a for a in chosen if best_dst[a] == b]
        if len(group) == 1:
            continue
        mass = sum(size[t] for t in group)
        new_hidden[b] = sum(size[t] * hidden[t] for t in group) / mass
        new_residual[b] = sum(size[t] * residual[t] for t in group) / mass
        new_size[b] = mass
    kept = [t for t in range(L) if t not in chosen]
    return new_hidden[kept], new_residual[kept], kept_state(state, kept, new_size)


@register_twin
class ToMe(Twin):
    name = "tome"
    function = staticmethod(tome_step)
