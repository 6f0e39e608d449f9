"""ToP-ViM pruning (docs/conventions.md §8); reference twin: ``stm_ref.reduction.top``.

Importance = sum over channels of the clipped (>= 0) SSM output of each direction, in token order,
summed over the two directions; the least important tokens are dropped after the given layers (default
after 0-based layers 4, 9, 14 of 24, the same fractions of other depths; counts chosen to meet the
rate). Hidden-state alignment (``align=True``): a kept token whose scan-order predecessors were pruned
decays over the whole position gap, Abar = exp(gap * delta * A), its input term unchanged.
"""

from __future__ import annotations

from types import MappingProxyType

import torch

from .base import PruningMethod, register_method
from .tokens import gather_tokens

__all__ = ["ToP"]


@register_method
class ToP(PruningMethod):
    name = "top"
    defaults = MappingProxyType(dict(layers=None, align=True))

    @classmethod
    def example_options(cls, depth):
        return [dict(layers=list(range(depth - 1)), align=True), dict(layers=list(range(depth - 1)), align=False),
                dict(layers=None, align=True)]

    def overhead_flops(self, L, k):
        return 2 * L * self.cfg.d_inner  # clipped channel sums of both directions' outputs (top-k not counted)

    def decay_scales(self, tokens):
        if not self.options["align"]:
            return None
        pos = tokens.pos
        if pos.shape[1] in (0, self.cfg.num_tokens):
            return None  # nothing pruned yet: plain decay (decided from the shape; reading pos would sync)
        gap = (pos[:, 1:] - pos[:, :-1]).to(torch.float32)
        one = torch.ones_like(gap[:, :1])
        return torch.cat([one, gap], dim=1), torch.cat([gap, one], dim=1)

    def step(self, i, k, x, tokens, stats):
        imp = stats.forward.y.clamp_min(0).sum(dim=1) + stats.backward.y.clamp_min(0).sum(dim=1)  # (batch, L)
        imp = imp.to(torch.promote_types(imp.dtype, torch.float32))
        imp[torch.arange(x.shape[0], device=x.device), tokens.cls] = float("inf")
        kept = imp.topk(x.shape[1] - k, dim=1).indices.sort(dim=1).values
        return gather_tokens(x, kept), tokens.kept(kept)
