"""Token-recognition (EViT-style) pruning (docs/conventions.md §8); reference twin: ``stm_ref.reduction.evit``.

Importance = |class-token hidden attention| (eq. 5: the class token's row of alpha, from the forward
direction for tokens left of it and the backward direction for those right of it) averaged over
channels. To remove k tokens, the k+1 least important are fused into one token by importance-weighted
average, which sits at the position of the most important of them (order kept). Default layers as ToP.

Host syncs: one a step, reading the batch's smallest and largest class index, which bound the attention
computed. Bounds fixed by the schedule would do without it, but the other shapes they give change the
order of the channel sums and so the importances' last bits (docs/peers.md).
"""

from __future__ import annotations

from types import MappingProxyType

import torch

from ..ops.common import LOG2E
from .base import PruningMethod, register_method
from .tokens import gather_tokens, kept_from_mask

__all__ = ["EViT", "class_attention", "fuse_tokens"]


def _class_row(delta, B, C_cls, A, S):
    """mean over channels of |alpha[d, cls, j]| = |delta_j sum_n C_cls[n] exp(A[d, n] S_j[d]) B_j[n]| (eq. 5).

    delta, S: (batch, E, J); B: (batch, N, J); C_cls: (batch, N); A: (E, N). One state at a time keeps
    memory at (batch, E, J); exp2 with A * log2(e) (faster than exp on CPU)."""
    CB = C_cls[:, :, None] * B  # (batch, N, J)
    A2 = A * LOG2E
    alpha = torch.zeros_like(S)
    for n in range(A.shape[1]):
        alpha.addcmul_(torch.mul(A2[None, :, n, None], S).exp2_(), CB[:, n, None, :])
    return alpha.mul_(delta).abs_().mean(dim=1)


def _left_attention(f, cls, hi):
    """Forward direction, j < cls: S_j = delta summed over steps j+1 .. cls; (batch, hi) for j < hi."""
    c = cls[:, None, None]
    pos = torch.arange(0, hi + 1, device=cls.device)
    delta = f.delta_at(pos)  # (batch, E, hi + 1)
    cz = torch.cumsum(delta, dim=-1)
    S = (torch.gather(cz, 2, c.expand(-1, cz.shape[1], 1)) - cz[:, :, :hi]).clamp_min_(0)
    C_cls = torch.gather(f.C_at(pos), 2, c.expand(-1, f.A.shape[1], 1))[:, :, 0].to(delta.dtype)
    return _class_row(delta[:, :, :hi], f.B_at(pos[:hi]).to(delta.dtype), C_cls, f.A, S), pos[:hi]


def _right_attention(b, cls, lo, L):
    """Backward direction, j > cls: S_j = delta summed over steps cls .. j-1; (batch, L - lo - 1) for j > lo."""
    c = cls[:, None, None]
    pos = torch.arange(lo, L, device=cls.device)
    delta = b.delta_at(pos)  # (batch, E, L - lo)
    cz = torch.nn.functional.pad(torch.cumsum(delta, dim=-1), (1, 0))  # cz[k] = sum of delta[lo .. lo+k-1]
    S = (cz[:, :, 1:-1] - torch.gather(cz, 2, (c - lo).expand(-1, cz.shape[1], 1))).clamp_min_(0)
    C_cls = torch.gather(b.C_at(pos), 2, (c - lo).expand(-1, b.A.shape[1], 1))[:, :, 0].to(delta.dtype)
    return _class_row(delta[:, :, 1:], b.B_at(pos[1:]).to(delta.dtype), C_cls, b.A, S), pos[1:]


def class_attention(stats, cls):
    """|alpha[d, cls, j]| averaged over channels d (eq. 5), forward direction for j < cls, backward for j > cls.

    stats: the layer's ``LayerStats``; cls: (batch,) indices. Returns (batch, L); 0 at cls. Each direction
    reads only the positions on its side of the class tokens (positions up to max(cls) forward, from
    min(cls) backward): half the work of a masked whole-sequence computation. Reading those two bounds is
    the method's one host sync (the module docstring says why it stays).
    """
    batch, L = cls.shape[0], stats.forward.L
    lo, hi = torch.stack(cls.aminmax()).tolist()  # both bounds in one read: int() of each would sync twice
    out = torch.zeros(batch, L, dtype=stats.forward.bias.dtype, device=cls.device)
    if hi > 0:
        row, pos = _left_attention(stats.forward, cls, hi)
        out[:, :hi] = row if lo == hi else row * (pos[None] < cls[:, None])
    if lo < L - 1:
        row, pos = _right_attention(stats.backward, cls, lo, L)
        out[:, lo + 1:] += row if lo == hi else row * (pos[None] > cls[:, None])  # sides overlap unless lo == hi
    return out


def fuse_tokens(x, pruned, importance):
    """The importance-weighted average (uniform if the importances are all 0) of the tokens ``pruned``
    (batch, k+1): the one token they become, (batch, d)."""
    w = torch.where(importance.sum(1, keepdim=True) > 0, importance, torch.ones_like(importance))
    w = w / w.sum(dim=1, keepdim=True)
    return (gather_tokens(x, pruned) * w[..., None].to(x.dtype)).sum(dim=1)


@register_method
class EViT(PruningMethod):
    name = "evit"
    defaults = MappingProxyType(dict(layers=None))

    @classmethod
    def example_options(cls, depth):
        return [dict(layers=list(range(depth - 1))), dict(layers=None)]

    def overhead_flops(self, L, k):
        # class-token attention: exp(A * S) times C_cls and B over (E, N) for every token, both sides
        return 3 * L * self.cfg.d_inner * self.cfg.d_state + (k + 1) * self.cfg.embed_dim

    def step(self, i, k, x, tokens, stats):
        batch, L, _ = x.shape
        rows = torch.arange(batch, device=x.device)
        imp = class_attention(stats, tokens.cls)
        imp = imp.to(torch.promote_types(imp.dtype, torch.float32))  # float64 models keep float64 weights
        imp[rows, tokens.cls] = float("inf")
        pruned = imp.argsort(dim=1)[:, : k + 1]  # (batch, k+1), least important first
        host = pruned[:, -1]  # the most important of them hosts the fused token
        fused = fuse_tokens(x, pruned, torch.gather(imp, 1, pruned))
        x = x.clone() if torch.is_grad_enabled() else x  # the stream belongs to this forward
        x[rows, host] = fused
        keep = torch.ones(batch, L, dtype=torch.bool, device=x.device)
        keep.scatter_(1, pruned[:, :-1], False)
        kept = kept_from_mask(keep, L - k)
        return gather_tokens(x, kept), tokens.kept(kept)
