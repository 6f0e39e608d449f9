"""ToP-ViM as released: ``reduce(model, "top", flavour="released")``; reference twin
``stm_ref.reduction.top_released``. docs/peers.md lists every difference to our ``top`` with line references
into ZLKong/ToP-ViM (``vim/models_mamba.py``, ``mamba-1p1p1/mamba_ssm/modules/mamba_simple.py``), each
reproduced here, including what looks like a bug:

* importance = the plain channel sum (no clipping) of the backward branch's gated SSM output, taken before
  it is flipped back, so index j scores the token at position N - 1 - j; the indices are then used as token
  positions (the kept set is the mirror image of the top-scored one);
* the class token, assumed at N // 2, is masked out of the ranking for the first image of the batch only;
  in the other images it can be selected too and then appears twice;
* keep k = ceil(keep_ratio * (N - 1)) tokens, made odd (197 -> 157 -> 125 -> 101 at 0.8): the top k - 1
  scores in index order, with the class row (from N // 2) inserted in the middle, at (k - 1) // 2;
* pruning after 0-based layers 4, 9, 14; a plain gather of both streams, no hidden-state alignment.
A rate is met by the keep_ratio (in steps of 0.01) whose schedule comes closest, within ±1 point.
"""

from __future__ import annotations

import math
from types import MappingProxyType

import torch

from .base import PruningMethod, register_flavour
from .schedule import TOLERANCE, rate_of, tokens_per_layer
from .tokens import TokenState, gather_tokens

__all__ = ["ToPReleased", "released_keep"]


def released_keep(N, keep_ratio):
    """Tokens kept (class token included) from N by the released rule: ceil(ratio * (N - 1)), made odd."""
    k = math.ceil(keep_ratio * (N - 1))
    return k + 1 if k % 2 == 0 else k


@register_flavour
class ToPReleased(PruningMethod):
    name = "top"
    flavour = "released"
    defaults = MappingProxyType(dict(flavour="released", layers=None, keep_ratio=0.8))

    @classmethod
    def example_options(cls, depth):
        return [dict(flavour="released", layers=list(range(depth - 1)), keep_ratio=r) for r in (0.6, 0.8)]

    def __init__(self, cfg, **options):
        super().__init__(cfg, **options)
        r = self.options["keep_ratio"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1:
            raise ValueError(f"top (released): keep_ratio must be a fraction in (0, 1), got {r!r}")

    def _schedule(self, keep_ratio):
        schedule, N = [0] * (self.cfg.depth - 1), self.cfg.num_tokens
        for layer in self.reduction_points():
            keep = min(released_keep(N, keep_ratio), N)
            schedule[layer], N = N - keep, keep
        return schedule

    def default_schedule(self):
        return self._schedule(self.options["keep_ratio"])

    def solve(self, rate):
        L0, depth = self.cfg.num_tokens, self.cfg.depth
        err, ratio, s = min(((abs(rate_of(tokens_per_layer(L0, s, depth)) - rate), r / 100, s)
                             for r in range(1, 100) for s in [self._schedule(r / 100)]), key=lambda t: t[0])
        if err > TOLERANCE:
            raise ValueError(f"top (released): no keep_ratio reaches a rate of {100 * rate:.1f}% within ±1 point")
        return s, {"keep_ratio": ratio}

    def overhead_flops(self, L, k):
        return L * self.cfg.d_inner  # the channel sum of one direction's output (top-k not counted)

    def step(self, i, k, x, tokens, stats):
        N = x.shape[1]
        c, keep = N // 2, N - k  # the released code's class index and the tokens it keeps
        score = stats.backward.y_in_scan_order.sum(dim=1)  # scan order, as released
        score = score.to(torch.promote_types(x.dtype, torch.float32))
        score[0, c] = float("-inf")  # the first image only (the released indexing)
        chosen = score.topk(keep - 1, dim=1).indices.sort(dim=1).values  # scan indices used as positions
        middle = (keep - 1) // 2
        new_x = _middle(gather_tokens(x, chosen), x[:, c:c + 1], middle)
        pos, size = (_middle(torch.gather(t, 1, chosen), t[:, c:c + 1], middle) for t in (tokens.pos, tokens.size))
        return new_x, TokenState(torch.full_like(tokens.cls, middle), middle, pos, size)


def _middle(rows, cls_row, middle):
    """The kept rows with the class row inserted at ``middle`` (the released placement)."""
    return torch.cat([rows[:, :middle], cls_row, rows[:, middle:]], dim=1)
