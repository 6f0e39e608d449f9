"""R-MeeTo as released: ``reduce(model, "tome", flavour="rmeeto", num_prune=...)``; reference twin
``stm_ref.reduction.rmeeto``. docs/peers.md lists every difference to our ``tome`` with line references into
NUS-HPC-AI-Lab/R-MeeTo (``image_task/R_MeeTo/merge.py``, ``RMeeTo_vim.py``), each reproduced here:

* the metric is the mixer output of the layer just run (before the residual add), cosine similarity;
* the class token is taken out of the sequence before the even/odd split (so sources are even positions
  left of it and odd positions right of it), and put back at ``int(c * (L - r) // L)``, one index for the
  whole batch, instead of its exact place;
* merges before blocks 2, 4, ... (after layers 1, 3, ...; ``odd=True``: after 0, 2, ...), r = min(num_prune,
  (L - 1) // 2) each, except that the last merge takes the sequence to L0 - n * compare tokens (n = (depth -
  1) // 2, 11 for Vim; skipped when that is not positive): with the released default compare = 11 a Vim-Ti
  run with num_prune 5 ends at 76 tokens (its last merge removes 71);
* size-weighted averages with carried sizes on both streams (``mode="prune"``: the sources are dropped);
  order kept (the released ``if_order``).
A rate is met by the num_prune (with ``compare`` fixed) whose released schedule comes closest, within ±1
point; ``num_prune`` alone gives the released schedule.
"""

from __future__ import annotations

from types import MappingProxyType

import torch

from ..layer_stats import StatsRequest
from .base import Method, register_flavour
from .schedule import TOLERANCE, is_integer, rate_of, tokens_per_layer
from .tokens import TokenState, gather_tokens, kept_from_mask
from .tome import ToMe

__all__ = ["RMeeTo", "released_schedule"]


def released_schedule(depth, L0, num_prune, compare, odd=False, interval=2):
    """The tokens R-MeeTo's released code removes after each layer (see the module docstring)."""
    blocks = [b for b in range(1, depth) if ((b + 1) % interval == 0 if odd else b % interval == 0)]
    target = L0 - ((depth - 1) // interval) * compare  # "197 - 11 * compare" for Vim
    schedule, L = [0] * (depth - 1), L0
    for b in blocks:
        r = num_prune if b != blocks[-1] else L - target
        r = min(r, (L - 1) // 2)
        if r > 0:
            schedule[b - 1] = r
            L -= r
    return schedule


@register_flavour
class RMeeTo(Method):
    name = "tome"
    flavour = "rmeeto"
    defaults = MappingProxyType(dict(flavour="rmeeto", num_prune=None, compare=11, odd=False, mode="merge"))

    @classmethod
    def example_options(cls, depth):
        return [dict(flavour="rmeeto", num_prune=n, compare=c, odd=odd, mode=mode)
                for n, c, odd, mode in ((2, 1, False, "merge"), (1, 1, True, "prune"), (3, 2, False, "merge"))]

    def __init__(self, cfg, **options):
        super().__init__(cfg, **options)
        o = self.options
        if o["num_prune"] is not None and (not is_integer(o["num_prune"]) or o["num_prune"] < 1):
            raise ValueError(f"tome (rmeeto): num_prune must be a positive integer, got {o['num_prune']!r}")
        if not is_integer(o["compare"]) or o["compare"] < 0:
            raise ValueError(f"tome (rmeeto): compare must be a non-negative integer, got {o['compare']!r}")
        if o["mode"] not in ("merge", "prune"):
            raise ValueError(f"tome (rmeeto): mode must be 'merge' or 'prune', got {o['mode']!r}")

    def _schedule(self, num_prune):
        o = self.options
        return released_schedule(self.cfg.depth, self.cfg.num_tokens, num_prune, o["compare"], o["odd"])

    def default_schedule(self):
        return None if self.options["num_prune"] is None else self._schedule(self.options["num_prune"])

    def solve(self, rate):
        L0, depth = self.cfg.num_tokens, self.cfg.depth
        tried = [(abs(rate_of(tokens_per_layer(L0, s, depth)) - rate), r, s)
                 for r in range(1, L0) for s in [self._schedule(r)]]
        err, r, s = min(tried, key=lambda t: t[0])
        if err > TOLERANCE:
            reach = sorted({round(100 * rate_of(tokens_per_layer(L0, s, depth)), 1) for _, _, s in tried})
            raise ValueError(f"tome (rmeeto): no num_prune reaches a rate of {100 * rate:.1f}% within ±1 point with "
                             f"compare={self.options['compare']} (its released rule reaches {reach[:12]}{'...' if len(reach) > 12 else ''}%); "
                             f"pass num_prune=... or another compare")
        return s, {"num_prune": r}

    def reduction_points(self):
        return [b - 1 for b in range(1, self.cfg.depth) if ((b + 1) % 2 == 0 if self.options["odd"] else b % 2 == 0)]

    def max_per_step(self, L):
        return (L - 1) // 2

    def stats_request(self, k):
        return StatsRequest(output=True)  # the metric is the mixer output itself

    def overhead_flops(self, L, k):
        return ToMe.overhead_flops(self, L, k)

    def step(self, i, k, x, tokens, stats):
        batch, L, _ = x.shape
        c = tokens.shared_cls  # the released code keeps one class index for the whole batch
        rest = torch.cat([torch.arange(c, device=x.device), torch.arange(c + 1, L, device=x.device)])
        m = stats.output.index_select(1, rest).to(x.dtype)
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        node_max, node_idx = (m[:, 0::2] @ m[:, 1::2].transpose(1, 2)).max(dim=-1)
        src = node_max.argsort(dim=-1, descending=True, stable=True)[:, :k]  # indices among the even slots
        xr, size = x.index_select(1, rest), tokens.size.index_select(1, rest)
        if self.options["mode"] == "merge":
            xr, size = ToMe._merge(xr, size, src, torch.gather(node_idx, 1, src))
        keep = torch.ones(batch, L - 1, dtype=torch.bool, device=x.device)
        keep.scatter_(1, 2 * src, False)
        kept = kept_from_mask(keep, L - 1 - k)
        new_c = int(c * (L - k) // L)  # the released proportional rule, not the exact place
        return _insert(gather_tokens(xr, kept), x[:, c:c + 1], new_c), _state(tokens, rest, kept, size, new_c)


def _insert(rows, cls_row, at):
    return torch.cat([rows[:, :at], cls_row, rows[:, at:]], dim=1)


def _state(tokens, rest, kept, size, new_c):
    """The per-image bookkeeping after the released re-insertion of the class token at ``new_c``."""
    pos_rest = tokens.pos.index_select(1, rest)
    pos = _insert(torch.gather(pos_rest, 1, kept), tokens.pos[:, tokens.shared_cls:tokens.shared_cls + 1], new_c)
    sz = _insert(torch.gather(size, 1, kept), tokens.size[:, tokens.shared_cls:tokens.shared_cls + 1], new_c)
    return TokenState(torch.full_like(tokens.cls, new_c), new_c, pos, sz)
