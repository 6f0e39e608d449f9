"""EViT-style pruning in float64, one image at a time (twin of ``stm_fast.reduction.evit``): docs/conventions.md §8."""

from __future__ import annotations

import numpy as np

from .. import ssm
from .base import Twin, euler, kept_state, register_twin

__all__ = ["EViT", "class_attention", "evit_step"]


def class_attention(stats, cls):
    """EViT importance (eq. 5): mean over channels of |alpha[d, cls, j]|, the class token's row of the hidden
    attention (Euler Abar, Bbar), from the forward direction for j < cls and the backward one for j > cls. (L,); 0 at cls.
    """
    fwd, bwd = stats["forward"], stats["backward"]
    L = fwd["delta"].shape[1]
    imp = np.zeros(L)
    Abar, Bbar = euler(fwd)
    alpha = ssm.hidden_attention(Abar, Bbar, fwd["C"].T)  # (E, L, L), alpha[:, t, j] for j <= t
    for j in range(cls):
        imp[j] = np.mean(np.abs(alpha[:, cls, j]))
    # Backward: scan the flipped sequence (position t sits at index L-1-t), then map back.
    flipped = {"delta": bwd["delta"][:, ::-1], "A": bwd["A"], "B": bwd["B"][:, ::-1]}
    Abar, Bbar = euler(flipped)
    alpha = ssm.hidden_attention(Abar, Bbar, bwd["C"][:, ::-1].T)
    for j in range(cls + 1, L):
        imp[j] = np.mean(np.abs(alpha[:, L - 1 - cls, L - 1 - j]))
    return imp


def evit_step(k, hidden, residual, state, stats, options):
    """EViT-style token recognition: the k+1 least important tokens (``class_attention``) are fused into one by
    importance-weighted average (uniform if their importances are all 0), placed at the position of the most
    important of them; the other k are dropped. The class token stays; order kept."""
    L = hidden.shape[0]
    cls = state["cls"]
    if k + 1 > L - 1:
        raise ValueError(f"evit: cannot fuse {k + 1} of {L} tokens (the class token stays)")
    imp = class_attention(stats, cls)
    pruned = sorted((t for t in range(L) if t != cls), key=lambda t: imp[t])[: k + 1]  # least important first
    host = pruned[-1]
    w = np.array([imp[t] for t in pruned])
    if not w.sum() > 0:
        w = np.ones(len(pruned))
    w = w / w.sum()
    hidden, residual = hidden.copy(), residual.copy()
    hidden[host] = sum(wi * hidden[t] for wi, t in zip(w, pruned))
    residual[host] = sum(wi * residual[t] for wi, t in zip(w, pruned))
    kept = [t for t in range(L) if t not in pruned[:-1]]
    return hidden[kept], residual[kept], kept_state(state, kept)


@register_twin
class EViT(Twin):
    name = "evit"
    function = staticmethod(evit_step)
