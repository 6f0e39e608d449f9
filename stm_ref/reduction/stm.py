"""STM in float64, one image at a time (twin of ``stm_fast.reduction.stm``): docs/conventions.md §3-4."""

from __future__ import annotations

import numpy as np

from .. import merge
from .base import Twin, euler, register_twin

__all__ = ["STM", "stm_step"]


def stm_step(k, hidden, residual, state, stats, options):
    """STM (docs/conventions.md §3-4): BNNM plan, scalar weights of eq. 11 from this layer's statistics, same merge on both streams."""
    sides = options.get("sides", "both")
    r_left, r_right = {"both": (k // 2, k // 2), "left": (k, 0), "right": (0, k)}[sides]
    L = hidden.shape[0]
    plan = merge.merge_plan(L, state["cls"], r_left, r_right, options.get("positions", "ends"))
    variant = options.get("weights", "lsq")
    weights = {}
    for direction in ("forward", "backward"):
        Abar, Bbar = euler(stats[direction])
        weights.update(merge.token_weights(Abar, Bbar, plan, direction, variant, u=stats[direction]["u"].T,
                                           size=state["size"]))
    each = "avg" if variant == "noise" else variant  # noise replaces the sum of both streams, below
    hidden = merge.merge_tokens(hidden, plan, weights, each)
    residual = merge.merge_tokens(residual, plan, weights, each)
    if variant == "noise":
        hidden, residual = _noised(hidden, residual, plan, L)
    return hidden, residual, _merged_state(state, plan, variant)


def _noised(hidden, residual, plan, L):
    """The noise control: each token that received a merge, in the stream the next layer adds up (hidden +
    residual), replaced by ``merge.noise_row`` of the same root mean square."""
    kept = [int(k) for k in plan.kept]
    for q in sorted({int(q) for q in plan.target}):
        i = kept.index(q)
        total = hidden[i] + residual[i]
        residual[i] = merge.noise_row(L, q, total.shape[0]) * np.sqrt(np.mean(total * total))
        hidden[i] = 0.0
    return hidden, residual


def _merged_state(state, plan, variant):
    """The state after the plan: a kept token's size grows by the sizes merged into it (not for ``drop``)."""
    size = np.array(state["size"], dtype=np.float64)
    if variant != "drop":
        for j, q in zip(plan.reduced, plan.target):
            size[int(q)] += size[int(j)]
    return {"cls": plan.new_cls, "pos": state["pos"][plan.kept], "size": size[plan.kept]}


@register_twin
class STM(Twin):
    name = "stm"
    function = staticmethod(stm_step)
