"""R-MeeTo as released, in float64, one image at a time (twin of ``stm_fast.reduction.rmeeto``; docs/peers.md)."""

from __future__ import annotations

import numpy as np

from .base import Twin, register_twin, unit

__all__ = ["RMeeTo", "rmeeto_step"]


def rmeeto_step(k, hidden, residual, state, stats, options):
    """Take the class token out; on the remaining tokens, even slots are sources and odd slots destinations;
    each source's best destination by cosine similarity of the *mixer output* (``hidden``); the k sources
    with the highest similarity merge into their destinations by size-weighted average on both streams
    (``mode="prune"``: they are dropped); order kept; the class token goes back at int(c * (L - k) // L)."""
    L = hidden.shape[0]
    c = state["cls"]
    rest = [t for t in range(L) if t != c]
    metric = {t: unit(hidden[t]) for t in rest}
    sources, dests = rest[0::2], rest[1::2]
    best = {}
    for a in sources:
        sims = [float(metric[a] @ metric[b]) for b in dests]
        j = int(np.argmax(sims))  # first of equal maxima
        best[a] = (sims[j], dests[j])
    chosen = sorted(sources, key=lambda a: -best[a][0])[:k]  # stable: ties keep index order
    size = state["size"].astype(np.float64).copy()
    new_hidden, new_residual, new_size = hidden.copy(), residual.copy(), size.copy()
    if options.get("mode", "merge") == "merge":
        for b in dests:
            group = [b] + [a for a in chosen if best[a][1] == b]
            mass = sum(size[t] for t in group)
            new_hidden[b] = sum(size[t] * hidden[t] for t in group) / mass
            new_residual[b] = sum(size[t] * residual[t] for t in group) / mass
            new_size[b] = mass
    kept = [t for t in rest if t not in chosen]
    new_c = int(c * (L - k) // L)
    order = kept[:new_c] + [c] + kept[new_c:]
    return new_hidden[order], new_residual[order], {"cls": new_c, "pos": state["pos"][order], "size": new_size[order]}


@register_twin
class RMeeTo(Twin):
    name = "tome"
    flavour = "rmeeto"
    function = staticmethod(rmeeto_step)
