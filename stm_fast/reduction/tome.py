"""ToMe / R-MeeTo / Famba-V merging (docs/conventions.md §8); reference twin: ``stm_ref.reduction.tome``.

Bipartite soft matching on alternating tokens (even and odd indices of the current sequence) by cosine
similarity of the next block's input (residual + mixer output); the class token is neither a source nor
a destination; the k most similar even tokens merge into their best odd partner by size-weighted
average, sizes carried across layers; order kept (a merged token sits at its destination's position).
``layers``: 'every_other' (R-MeeTo: after layers 1, 3, ..., i.e. before layers 2, 4, ...; the default),
'all', 'lower' / 'upper' (Famba-V: first / second half), or a list of layer indices.
"""

from __future__ import annotations

from types import MappingProxyType

import torch

from .base import Method, check_layers, register_method
from .tokens import gather_tokens, kept_from_mask

__all__ = ["ToMe", "TOME_LAYERS"]

TOME_LAYERS = ("all", "every_other", "lower", "upper")


@register_method
class ToMe(Method):
    name = "tome"
    defaults = MappingProxyType(dict(layers="every_other"))

    @classmethod
    def example_options(cls, depth):
        return [dict(layers=choice) for choice in TOME_LAYERS] + [dict(layers=list(range(depth - 1)))]

    def reduction_points(self):
        depth, choice = self.cfg.depth, self.options["layers"]
        if isinstance(choice, str):
            if choice not in TOME_LAYERS:
                raise ValueError(f"tome: layers must be one of {TOME_LAYERS} or a list of layer indices, got {choice!r}")
            choice = {"all": range(depth - 1), "every_other": range(1, depth - 1, 2),
                      "lower": range(0, depth // 2), "upper": range(depth // 2, depth - 1)}[choice]
        return check_layers("tome", choice, depth)

    def max_per_step(self, L):
        # even-index sources and odd-index destinations, the class token (either parity) excluded from both:
        # at least one destination must remain
        return (L + 1) // 2 - 1 if L // 2 >= 2 else 0

    def overhead_flops(self, L, k):
        # cosine similarities of L/2 sources to L/2 destinations over d channels, normalisation, size-weighted merges
        d = self.cfg.embed_dim
        return (L // 2) * ((L + 1) // 2) * d + L * d + 2 * k * d

    def stats_request(self, k):
        return None  # the metric is the stream itself

    def step(self, i, k, x, tokens, stats):
        batch, L, _ = x.shape
        dev = x.device
        metric = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # x is the float32/64 residual stream
        scores = metric[:, 0::2] @ metric[:, 1::2].transpose(1, 2)  # (batch, La, Lb): even sources, odd destinations
        cls = tokens.cls[:, None]
        even, half = cls % 2 == 0, cls // 2
        neg = torch.finfo(scores.dtype).min
        # masks rather than boolean indexing, which reads the number of images it selects back from the device
        source = (torch.arange(scores.shape[1], device=dev) == half) & even  # (batch, La)
        dest = (torch.arange(scores.shape[2], device=dev) == half) & ~even  # (batch, Lb)
        scores.masked_fill_(source[:, :, None], neg)  # the class token is never a source ...
        scores.masked_fill_(dest[:, None, :], neg)  # ... nor a destination
        node_max, node_idx = scores.max(dim=-1)  # best destination of each even token
        src = node_max.argsort(dim=-1, descending=True)[:, :k]  # (batch, k) indices into the even positions
        dst = torch.gather(node_idx, 1, src)  # indices into the odd positions
        x, size = self._merge(x, tokens.size, src, dst)
        keep = torch.ones(batch, L, dtype=torch.bool, device=dev)
        keep.scatter_(1, 2 * src, False)
        kept = kept_from_mask(keep, L - k)
        return gather_tokens(x, kept), tokens.kept(kept, size)

    @staticmethod
    def _merge(x, size, src, dst):
        """Size-weighted averages of the chosen even tokens into their odd destinations; (x, new sizes)."""
        s_src = torch.gather(size[:, 0::2], 1, src)  # (batch, k)
        mass = size[:, 1::2].scatter_add(1, dst, s_src)
        new_size = size.clone()
        new_size[:, 1::2] = mass
        tb = x[:, 1::2] * size[:, 1::2, None].to(x.dtype)
        contrib = gather_tokens(x[:, 0::2], src) * s_src[..., None].to(x.dtype)
        tb = tb.scatter_add(1, dst[..., None].expand(-1, -1, x.shape[-1]), contrib) / mass[..., None].to(x.dtype)
        x = x.clone() if torch.is_grad_enabled() else x  # the stream belongs to this forward
        x[:, 1::2] = tb
        return x, new_size
