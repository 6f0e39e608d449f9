"""MTR, Mamba token reduction (Ma et al., "Training-free Token Reduction for Vision Mamba", arXiv 2507.14042);
reference twin: ``stm_ref.reduction.mtr``. docs/conventions.md §8 states the method and every choice below.

Importance of a token = its step size Delta (softplus(dt + bias)), averaged over the channels and summed
over the two scan directions, from the layer just run (a large step means the scan takes the token in).
To remove k tokens: the k least important patch tokens are the Sources; of the remaining patch tokens the
``keep_frac`` most important are kept untouched (Keep) and the others are Targets; each Source merges into
its most similar Target (cosine similarity of the stream x = residual + mixer output), each Target
becoming the plain mean of itself and the Sources it receives; the survivors keep their original order.
The class token is always kept and never merged. Default layers as ToP (after 4, 9, 14 of 24).
"""

from __future__ import annotations

import math
from types import MappingProxyType

import torch

from .base import PruningMethod, register_method
from .tokens import gather_tokens, kept_from_mask

__all__ = ["MTR", "mtr_importance", "keep_count"]


def mtr_importance(stats) -> torch.Tensor:
    """(batch, L): mean over channels of Delta, forward + backward direction, in token position order."""
    return stats.forward.delta.mean(dim=1) + stats.backward.delta.mean(dim=1)


def keep_count(L: int, k: int, keep_frac: float) -> int:
    """Patch tokens kept untouched (the Keep group) when k of L tokens are removed: ceil(keep_frac * (L-1-k))."""
    return math.ceil(keep_frac * (L - 1 - k))


@register_method
class MTR(PruningMethod):
    name = "mtr"
    defaults = MappingProxyType(dict(layers=None, keep_frac=0.5))

    @classmethod
    def example_options(cls, depth):
        return [dict(layers=list(range(depth - 1)), keep_frac=f) for f in (0.0, 0.5)] + [dict(layers=None)]

    def __init__(self, cfg, **options):
        super().__init__(cfg, **options)
        f = self.options["keep_frac"]
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1:
            raise ValueError(f"mtr: keep_frac must be a fraction in [0, 1) of the tokens that are not merged, got {f!r}")

    def max_per_step(self, L):
        # the class token, the Keep group and at least one Target stay
        k = L - 2
        while k > 0 and L - 1 - k - keep_count(L, k, self.options["keep_frac"]) < 1:
            k -= 1
        return k

    def overhead_flops(self, L, k):
        # the importance (a channel mean of both directions' Delta), cosine similarities of the k Sources to the
        # Targets over d channels, normalisation of the stream and the merges
        d = self.cfg.embed_dim
        targets = L - 1 - k - keep_count(L, k, self.options["keep_frac"])
        return 2 * L * self.cfg.d_inner + k * targets * d + L * d + k * d

    def step(self, i, k, x, tokens, stats):
        batch, L, _ = x.shape
        rows = torch.arange(batch, device=x.device)
        imp = mtr_importance(stats).to(torch.promote_types(x.dtype, torch.float32))
        imp[rows, tokens.cls] = float("inf")  # the class token: always in Keep
        order = imp.argsort(dim=1, descending=True, stable=True)
        keep_n = 1 + keep_count(L, k, self.options["keep_frac"])
        targets, sources = order[:, keep_n:L - k], order[:, L - k:]
        metric = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        sim = gather_tokens(metric, sources) @ gather_tokens(metric, targets).transpose(1, 2)  # (batch, k, T)
        dst = torch.gather(targets, 1, sim.argmax(dim=-1))  # each Source's Target, as a token index
        x = _merge_into(x, sources, dst)
        keep = torch.ones(batch, L, dtype=torch.bool, device=x.device)
        keep.scatter_(1, sources, False)
        kept = kept_from_mask(keep, L - k)  # ascending: the original order restored
        return gather_tokens(x, kept), tokens.kept(kept)


def _merge_into(x, sources, dst):
    """Each destination token becomes the plain mean of itself and the sources assigned to it."""
    batch, L, C = x.shape
    flat = lambda idx: (idx + torch.arange(batch, device=x.device)[:, None] * L).reshape(-1)  # noqa: E731
    rows = x.reshape(batch * L, C)
    total = rows.index_add(0, flat(dst), rows.index_select(0, flat(sources)))
    count = torch.ones(batch * L, dtype=x.dtype, device=x.device).index_add_(0, flat(dst), torch.ones_like(flat(dst), dtype=x.dtype))
    return (total / count[:, None]).view(batch, L, C)
