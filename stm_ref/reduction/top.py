"""ToP-ViM pruning in float64, one image at a time (twin of ``stm_fast.reduction.top``): docs/conventions.md §8."""

from __future__ import annotations

import numpy as np

from .base import Twin, kept_state, register_twin

__all__ = ["ToP", "top_importance", "top_step", "top_scales"]


def top_importance(stats):
    """ToP-ViM importance of each token: sum over channels of max(y, 0), summed over both directions. (L,)"""
    L = stats["forward"]["y"].shape[1]
    imp = np.zeros(L)
    for direction in ("forward", "backward"):
        y = stats[direction]["y"]
        for t in range(L):
            imp[t] += np.sum(np.maximum(y[:, t], 0.0))
    return imp


def top_step(k, hidden, residual, state, stats, options):
    """ToP-ViM: drop the k least important tokens (``top_importance``); the class token always stays; order kept."""
    L = hidden.shape[0]
    cls = state["cls"]
    if k > L - 1:
        raise ValueError(f"top: cannot drop {k} of {L} tokens (the class token stays)")
    imp = top_importance(stats)
    others = sorted((t for t in range(L) if t != cls), key=lambda t: -imp[t])
    kept = sorted([cls] + others[: L - 1 - k])
    return hidden[kept], residual[kept], kept_state(state, kept)


def top_scales(options, state):
    """ToP-ViM hidden-state alignment: Abar of a kept token decays over the whole gap its pruned
    predecessors (in scan order) left: forward pos[t] - pos[t-1] (1 at t = 0), backward pos[t+1] - pos[t]
    (1 at the last token). None while nothing was pruned, or with ``align=False``."""
    if not options.get("align", True):
        return None
    pos = [int(p) for p in state["pos"]]
    n = len(pos)
    if n == 0 or pos == list(range(n)):
        return None
    forward = np.ones(n)
    backward = np.ones(n)
    for t in range(1, n):
        forward[t] = pos[t] - pos[t - 1]
    for t in range(n - 1):
        backward[t] = pos[t + 1] - pos[t]
    return forward, backward


@register_twin
class ToP(Twin):
    name = "top"
    function = staticmethod(top_step)

    def decay_scales(self, tokens):
        return top_scales(self.options, tokens)
