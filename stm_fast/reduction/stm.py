"""STM: BNNM merge plans (docs/conventions.md §3) with HSP weights (§4, eq. 11) from the layer just run.

Reference twin: ``stm_ref.reduction.stm``. The batched plan indices, weights and merges are in
``stm_fast.reduction.merge`` (twin of ``stm_ref.merge``); this module is STM's adapter to the layer loop.
"""

from __future__ import annotations

from types import MappingProxyType

import torch

from dataclasses import replace

from .merge import (TOKEN_WEIGHT_VARIANTS, ends_weights, merge_ends, merge_tokens, merged_sizes, plan_index,
                     token_weights, weight_variant)
from ..layer_stats import StatsRequest
from .base import Method, register_method
from .schedule import is_integer

__all__ = ["STM", "STM_DEFAULTS"]

STM_DEFAULTS = MappingProxyType(dict(sides="both", positions="ends", weights="lsq", start_layer=0))


@register_method
class STM(Method):
    """Options: ``sides`` ('both' | 'left' | 'right'), ``positions`` ('ends' | 'uniform'), ``weights``
    (one of ``TOKEN_WEIGHT_VARIANTS``), ``start_layer`` (the first layer after which tokens merge)."""

    name = "stm"
    defaults = STM_DEFAULTS

    @classmethod
    def example_options(cls, depth):
        """Every weight variant once, the sides and plans in turn (a variant made for the ends plan with it),
        and a late start."""
        sides, positions = ("both", "left", "right"), ("ends", "uniform")
        out = [dict(sides=sides[n % 3], positions="ends" if weight_variant(w).ends_only else positions[n % 2], weights=w)
               for n, w in enumerate(TOKEN_WEIGHT_VARIANTS)]
        return out + [dict(start_layer=max(depth // 2 - 1, 0))]

    def __init__(self, cfg, **options):
        super().__init__(cfg, **options)
        o = self.options
        if o["sides"] not in ("both", "left", "right"):
            raise ValueError(f"stm: sides must be 'both', 'left' or 'right', got {o['sides']!r}")
        if o["positions"] not in ("ends", "uniform"):
            raise ValueError(f"stm: positions must be 'ends' or 'uniform', got {o['positions']!r}")
        if o["weights"] not in TOKEN_WEIGHT_VARIANTS:
            raise ValueError(f"stm: weights must be one of {TOKEN_WEIGHT_VARIANTS}, got {o['weights']!r}")
        if weight_variant(o["weights"]).ends_only and o["positions"] != "ends":
            raise ValueError(f"stm: weights={o['weights']!r} is implemented for positions='ends' only")
        start = o["start_layer"]
        if not is_integer(start) or not 0 <= start <= cfg.depth - 2:
            raise ValueError(f"stm: start_layer must be an integer in 0..{cfg.depth - 2} (merges happen between layers), "
                             f"got {start!r}")
        self.step_unit = 2 if o["sides"] == "both" else 1

    def reduction_points(self):
        return list(range(self.options["start_layer"], self.cfg.depth - 1))

    def token_budget(self):
        c = self.cfg.cls_position
        n_left, n_right = c, self.cfg.num_patches - c
        side = {"both": min(n_left, n_right), "left": n_left, "right": n_right}[self.options["sides"]]
        return self.step_unit * max(side - 1, 0)

    def side_split(self, k: int) -> tuple[int, int]:
        """(tokens reduced on the left, on the right) for a k-token step."""
        sides = self.options["sides"]
        if sides == "both":
            return k // 2, k // 2
        return (k, 0) if sides == "left" else (0, k)

    def stats_request(self, k):
        # the ends plan reads only each direction's first r + 1 scan steps: reuse the scan's delta and Abar there
        if self.options["positions"] != "ends" or not weight_variant(self.options["weights"]).reads_first_steps:
            return StatsRequest()
        return StatsRequest(first_steps=max(self.side_split(k)) + 1)

    def overhead_flops(self, L, k):
        # weights: per reduced token, P = exp(A * S) and the lsq products over (E, N) (~4 E N), plus the
        # merge itself: a multiply-add of d channels on the stream
        reads = weight_variant(self.options["weights"]).reads_statistics
        weights = 4 * k * self.cfg.d_inner * self.cfg.d_state if reads else 0
        return weights + k * self.cfg.embed_dim

    def step(self, i, k, x, tokens, stats):
        r_left, r_right = self.side_split(k)
        plan = plan_index(x.shape[1], tokens.shared_cls, r_left, r_right, self.options["positions"], x.device)
        variant = self.options["weights"]
        spec = weight_variant(variant)
        inplace = not torch.is_grad_enabled()  # the stream belongs to this forward: merge into it (a view for ends)
        sizes = merged_sizes(tokens.size, plan, variant)
        if spec.sizes is not None:  # weights from the tokens' sizes
            x = merge_tokens(x, plan, spec.sizes(tokens.size, plan).to(x.dtype), variant, inplace=inplace)
        elif plan.ends is not None:  # slices and one small matrix product per side, weights kept split by side
            w = (None, None) if variant == "drop" else ends_weights(stats, r_left, r_right, variant)
            x = merge_ends(x, r_left, r_right, *w, variant, inplace=inplace)
        else:
            w = None if variant == "drop" else token_weights(stats, plan, variant)
            x = merge_tokens(x, plan, w, variant, inplace=inplace)
        return x, replace(tokens.planned(plan), size=sizes)
