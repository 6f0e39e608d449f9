"""What the reference reductions share: the per-image state after keeping tokens, the Euler
discretisation of a layer's statistics, and the unit vectors of the cosine metric."""

from __future__ import annotations

import numpy as np

from .. import ssm

__all__ = ["euler", "kept_state", "unit"]


def euler(stats):
    """Per direction: Abar, Bbar (L, E, N) with Mamba's Euler discretisation."""
    return ssm.discretize(stats["delta"].T, stats["A"], stats["B"].T, "euler")


def unit(v):
    """v / max(|v|, 1e-12) (the cosine-similarity metric)."""
    return v / max(float(np.sqrt(np.sum(v * v))), 1e-12)


def kept_state(state, kept, size=None):
    """The state after keeping the ascending positions ``kept`` (the class token among them)."""
    cls = state["cls"]
    if cls not in kept:
        raise AssertionError("a reduction step must keep the class token")
    size = state["size"] if size is None else size
    return {"cls": kept.index(cls), "pos": state["pos"][kept], "size": size[kept]}
