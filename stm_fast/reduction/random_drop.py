"""Random token dropping, the usual floor of token-reduction papers (docs/peers.md § random); reference twin:
``stm_ref.reduction.random_drop``.

After each allowed layer, k tokens other than the class token are dropped at random; order kept. The draw
is a permutation of the L current indices from NumPy's generator seeded by (``seed``, L), the same for every
image of the batch (each image's class token is exempt): it is reproducible, the float64 twin draws the
same one, and it costs no host sync. Option ``layers``: the layers after which it drops (default: every
layer, as STM merges); ``seed``.
"""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
import torch

from .base import PruningMethod, check_layers, register_method
from .tokens import gather_tokens

__all__ = ["RandomDrop", "drop_order"]


def drop_order(seed: int, L: int) -> np.ndarray:
    """The priorities (L,) of the draw at L tokens: a permutation of 0..L-1; the lowest are dropped first."""
    return np.random.default_rng([seed, L]).permutation(L)


@register_method
class RandomDrop(PruningMethod):
    name = "random"
    defaults = MappingProxyType(dict(layers=None, seed=0))
    default_eval = False  # a floor, asked for by name (--methods random): the default grid stays the paper's

    @classmethod
    def example_options(cls, depth):
        return [dict(seed=0), dict(layers=list(range(0, depth - 1, 2)), seed=7)]

    def resolve_options(self, cfg, options):
        seed = options["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"random: seed must be a non-negative integer, got {seed!r}")
        layers = list(range(cfg.depth - 1)) if options["layers"] is None else options["layers"]
        return {**options, "layers": check_layers(self.name, layers, cfg.depth)}

    def stats_request(self, k):
        return None  # the draw reads nothing of the layer

    def step(self, i, k, x, tokens, stats):
        batch, L, _ = x.shape
        priority = torch.as_tensor(drop_order(self.options["seed"], L), device=x.device).expand(batch, L).clone()
        priority[torch.arange(batch, device=x.device), tokens.cls] = L  # the class token outranks every draw
        kept = priority.topk(L - k, dim=1).indices.sort(dim=1).values
        return gather_tokens(x, kept), tokens.kept(kept)
