"""Token reductions of the float64 reference Vim, one image at a time (twins of ``stm_fast.reduction``).

Each method is a ``Twin`` (``base.py``) registered under its fast method's name (and flavour), whose
``step(i, k, x, tokens, stats)`` has the fast step's name and arguments; it calls the module's step on one
image, ``<name>_step(k, hidden, residual, state, stats, options) -> (hidden, residual, state)``:
``hidden`` is the mixer output and ``residual`` the residual stream of the layer just run, both (L, d);
``state`` = {"cls": class index, "pos": original positions (L,), "size": merged-token sizes (L,)};
``stats`` = {"forward"/"backward": {delta (E, L) after softplus, B, C (N, L), A (E, N), y (E, L)}} in token
position order. Everything is written per token with explicit loops where that is clearer. Unlike the fast
path, which reduces the one stream residual + mixer output, the reference reduces both streams with the
same weights (docs/conventions.md §5): the two must agree.

Methods (``TWINS``), one module each: ``stm`` (docs/conventions.md §3-4) and the peers of §8, ``tome``,
``top`` (with its hidden-state alignment in ``decay_scales``), ``evit`` and ``mtr``, the released flavours
``rmeeto`` and ``top_released``, and whatever another module of this package registers (every module here
is imported). Data-dependent choices have no
ties for generic (random) inputs; where they tie, sorts here are stable (lower index first).
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import TWINS, Twin, register_twin
from .evit import class_attention, evit_step
from .mtr import mtr_importance, mtr_step
from .rmeeto import rmeeto_step
from .top_released import top_released_step
from .stm import stm_step
from .tome import tome_step
from .top import top_importance, top_scales, top_step

__all__ = ["TWINS", "Twin", "register_twin", "twin_for", "rmeeto_step", "top_released_step", "stm_step", "tome_step",
           "top_step", "evit_step", "mtr_step", "top_scales", "top_importance", "class_attention", "mtr_importance"]

for _module in pkgutil.iter_modules(__path__):  # a new method's twin registers itself: nothing to list here
    importlib.import_module(f"{__name__}.{_module.name}")


def twin_for(method, options):
    """The reference of ``method`` with these options (a flavour's when ``options["flavour"]`` is set)."""
    key = (method, options.get("flavour"))
    if key not in TWINS:
        raise ValueError(f"no float64 twin of {method!r} (flavour {key[1]!r}); twins: {sorted(TWINS, key=str)}")
    return TWINS[key](options)
