"""What the reference reductions share: the ``Twin`` interface and its registry, the per-image state after
keeping tokens, the Euler discretisation of a layer's statistics, and the unit vectors of the cosine metric."""

from __future__ import annotations

import numpy as np

from .. import ssm

__all__ = ["Twin", "TWINS", "register_twin", "euler", "kept_state", "unit"]


class Twin:
    """The float64 twin of one fast method (``stm_fast.reduction``'s ``Method`` of the same ``name`` and
    ``flavour``), with its options fixed. ``step(i, k, x, tokens, stats)`` has the fast step's name and
    arguments: ``x`` is the pair (mixer output, residual stream) of the layer just run, each (L, d), which
    the reference reduces separately with the same choices (docs/conventions.md §5); ``tokens`` the image's
    state {"cls", "pos", "size"}; ``stats`` the layer's statistics (package docstring). ``function`` is the
    module's step on one image, ``(k, hidden, residual, state, stats, options) -> (hidden, residual, state)``."""

    name = "?"
    flavour = None
    function = None

    def __init__(self, options):
        self.options = dict(options)

    def step(self, i, k, x, tokens, stats):
        """Reduce the image's two streams x = (hidden, residual) after layer i by k tokens: (x', tokens')."""
        hidden, residual, tokens = type(self).function(k, *x, tokens, stats, self.options)
        return (hidden, residual), tokens

    def decay_scales(self, tokens):
        """Abar scales (forward, backward) for the next layer, or None (no alignment)."""
        return None


TWINS = {}  # (method, flavour or None) -> Twin subclass


def register_twin(cls):
    """Class decorator: ``cls`` becomes the reference of the fast method ``cls.name`` (flavour ``cls.flavour``)."""
    TWINS[(cls.name, cls.flavour)] = cls
    return cls


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
