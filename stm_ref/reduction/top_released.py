"""ToP-ViM as released, in float64, one image at a time (twin of ``stm_fast.reduction.top_released``;
docs/peers.md)."""

from __future__ import annotations

import math

import numpy as np

from .base import Twin, register_twin

__all__ = ["ToPReleased", "top_released_step"]


def top_released_step(k, hidden, residual, state, stats, options):
    """Score index j by the channel sum of the backward output at scan step j (position N - 1 - j), no
    clipping; mask index N // 2 for the first image of the batch only (``options["image_index"] == 0``); keep the
    N - k - 1 top-scored indices, as positions, in ascending order, and insert the row at N // 2 after the
    first (N - k - 1) // 2 of them. Both streams alike."""
    N = hidden.shape[0]
    c, keep = N // 2, N - k
    y_scan = stats["backward"]["y"][:, ::-1]  # back to the branch's own (flipped) order
    score = np.array([float(np.sum(y_scan[:, j])) for j in range(N)])
    if options.get("image_index", 0) == 0:
        score[c] = -math.inf
    chosen = sorted(sorted(range(N), key=lambda j: (-score[j], j))[:keep - 1])
    middle = (keep - 1) // 2
    order = chosen[:middle] + [c] + chosen[middle:]
    return hidden[order], residual[order], {"cls": middle, "pos": state["pos"][order], "size": state["size"][order]}


@register_twin
class ToPReleased(Twin):
    name = "top"
    flavour = "released"
    function = staticmethod(top_released_step)
