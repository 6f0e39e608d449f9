"""Token reductions of the float64 reference Vim, one image at a time (twins of stm_fast.reduce / peers).

Each step has the signature ``step(k, hidden, residual, state, stats, options) -> (hidden, residual, state)``:
``hidden`` is the mixer output and ``residual`` the residual stream of the layer just run, both (L, d);
``state`` = {"cls": class index, "pos": original positions (L,), "size": merged-token sizes (L,)};
``stats`` = {"forward"/"backward": {delta (E, L) after softplus, B, C (N, L), A (E, N), y (E, L)}} in token
position order. Everything is written per token with explicit loops where that is clearer.
"""

from __future__ import annotations

import numpy as np

from . import merge, ssm

__all__ = ["STEPS", "stm_step", "decay_scales"]


def _euler(stats):
    """Per direction: Abar, Bbar (L, E, N) with Mamba's Euler discretisation."""
    return ssm.discretize(stats["delta"].T, stats["A"], stats["B"].T, "euler")


def stm_step(k, hidden, residual, state, stats, options):
    """STM (SPEC §3-4): BNNM plan, scalar weights of eq. 11 from this layer's statistics, same merge on both streams."""
    sides = options.get("sides", "both")
    r_left, r_right = {"both": (k // 2, k // 2), "left": (k, 0), "right": (0, k)}[sides]
    L = hidden.shape[0]
    plan = merge.merge_plan(L, state["cls"], r_left, r_right, options.get("positions", "ends"))
    variant = options.get("weights", "lsq")
    weights = {}
    for direction in ("forward", "backward"):
        Abar, Bbar = _euler(stats[direction])
        weights.update(merge.token_weights(Abar, Bbar, plan, direction, variant))
    hidden = merge.merge_tokens(hidden, plan, weights, variant)
    residual = merge.merge_tokens(residual, plan, weights, variant)
    state = {"cls": plan.new_cls, "pos": state["pos"][plan.kept], "size": state["size"][plan.kept]}
    return hidden, residual, state


STEPS = {"stm": stm_step}


def decay_scales(method, options, state):
    """Abar scales (forward, backward) for the next layer, or None. Only ToP-style alignment uses them."""
    hook = _SCALES.get(method)
    return None if hook is None else hook(options, state)


_SCALES = {}
