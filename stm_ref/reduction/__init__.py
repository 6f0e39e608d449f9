"""Token reductions of the float64 reference Vim, one image at a time (twins of ``stm_fast.reduction``).

Each step has the signature ``step(k, hidden, residual, state, stats, options) -> (hidden, residual, state)``:
``hidden`` is the mixer output and ``residual`` the residual stream of the layer just run, both (L, d);
``state`` = {"cls": class index, "pos": original positions (L,), "size": merged-token sizes (L,)};
``stats`` = {"forward"/"backward": {delta (E, L) after softplus, B, C (N, L), A (E, N), y (E, L)}} in token
position order. Everything is written per token with explicit loops where that is clearer. Unlike the fast
path, which reduces the one stream residual + mixer output, the reference reduces both streams with the
same weights (docs/conventions.md §5): the two must agree.

Methods (``STEPS``), one module each: ``stm`` (docs/conventions.md §3-4) and the peers of §8, ``tome``,
``top`` (with its hidden-state alignment in ``decay_scales``), ``evit`` and ``mtr``. Data-dependent choices have no
ties for generic (random) inputs; where they tie, sorts here are stable (lower index first).
"""

from __future__ import annotations

from .evit import class_attention, evit_step
from .mtr import mtr_importance, mtr_step
from .rmeeto import rmeeto_step
from .top_released import top_released_step
from .stm import stm_step
from .tome import tome_step
from .top import top_importance, top_scales, top_step

__all__ = ["STEPS", "FLAVOURS", "step_for", "decay_scales", "rmeeto_step", "top_released_step", "stm_step", "tome_step", "top_step", "evit_step", "mtr_step", "top_scales",
           "top_importance", "class_attention", "mtr_importance"]

STEPS = {"stm": stm_step, "tome": tome_step, "top": top_step, "evit": evit_step, "mtr": mtr_step}
FLAVOURS = {("tome", "rmeeto"): rmeeto_step, ("top", "released"): top_released_step}  # the peers' released code (docs/peers.md)


def step_for(method, options):
    """The reference step of ``method`` with these options (a flavour's when ``options["flavour"]`` is set)."""
    flavour = options.get("flavour")
    return STEPS[method] if flavour is None else FLAVOURS[(method, flavour)]
_SCALES = {"top": top_scales}


def decay_scales(method, options, state):
    """Abar scales (forward, backward) for the next layer, or None. Only ToP-style alignment uses them."""
    hook = None if options.get("flavour") else _SCALES.get(method)  # the released flavours align nothing
    return None if hook is None else hook(options, state)
