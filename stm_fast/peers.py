"""The methods STM is compared with (the paper's Table 2), training-free, behind ``stm_fast.reduce``.

* ``tome``: ToMe / R-MeeTo / Famba-V merging. Bipartite soft matching on alternating tokens (even and
  odd indices of the current sequence) by cosine similarity of the next block's input (residual +
  mixer output); the class token is neither a source nor a destination; the k most similar even tokens
  merge into their best odd partner by size-weighted average, sizes carried across layers; order kept
  (a merged token sits at its destination's position). ``layers``: 'all', 'every_other' (R-MeeTo:
  before layers 2, 4, ..., i.e. after layers 1, 3, ...), 'lower' / 'upper' (Famba-V: first / second half).
* ``top``: ToP-ViM pruning. Importance = sum over channels of the clipped (>= 0) SSM output of each
  direction, in token order, summed over the two directions; the least important tokens are dropped
  after the given layers (default after 0-based layers 4, 9, 14 of 24, the same fractions of other depths;
  counts chosen to meet the rate).
  Hidden-state alignment (``align=True``): a kept token whose scan-order predecessors were pruned decays
  over the whole position gap, Abar = exp(gap * delta * A), its input term unchanged.
* ``evit``: token-recognition (EViT-style) pruning. Importance = |class-token hidden attention| (eq. 5:
  the class token's row of alpha, from the forward direction for tokens left of it and the backward
  direction for those right of it) averaged over channels. To remove k tokens, the k+1 least important
  are fused into one token by importance-weighted average, which sits at the position of the most
  important of them (order kept). Default layers as ``top``.
"""

from __future__ import annotations

import torch

from .reduce import Reducer, _check_options
from .scan import _LOG2E

__all__ = ["ToMeReducer", "ToPReducer", "EViTReducer", "METHODS"]


def _gather_tokens(x, idx):
    """x (batch, L, C) at per-image indices idx (batch, K): whole rows of one flattened (batch * L, C)
    matrix (``index_select`` copies rows; ``gather`` with an expanded index was ~7x slower on CPU)."""
    batch, L, C = x.shape
    flat = (idx + torch.arange(batch, device=idx.device)[:, None] * L).reshape(-1)
    return x.reshape(batch * L, C).index_select(0, flat).view(batch, idx.shape[1], C)


def _kept_from_mask(mask):
    """Ascending kept indices (batch, K) from a (batch, L) mask with the same count per image."""
    batch = mask.shape[0]
    return torch.nonzero(mask, as_tuple=False)[:, 1].view(batch, -1)


def _new_state(state, kept):
    cls = (kept < state["cls"][:, None]).sum(dim=1)
    uniform = int(cls[0]) if bool((cls == cls[0]).all()) else None
    return dict(state, cls=cls, uniform_cls=uniform, pos=torch.gather(state["pos"], 1, kept),
                size=torch.gather(state["size"], 1, kept))


class ToMeReducer(Reducer):
    method = "tome"
    keeps_stats = False

    def overhead_flops(self, cfg, L, k):
        # cosine similarities of L/2 sources to L/2 destinations over d channels, normalisation, size-weighted merges
        return (L // 2) * ((L + 1) // 2) * cfg.embed_dim + L * cfg.embed_dim + 2 * k * cfg.embed_dim

    @staticmethod
    def max_per_step(L, cls):
        # even-index sources and odd-index destinations, the class token (either parity) excluded from both:
        # at least one destination must remain
        return (L + 1) // 2 - 1 if L // 2 >= 2 else 0

    def step(self, i, k, x, state, stats):
        batch, L, _ = x.shape
        dev = x.device
        metric = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # x is the float32/64 residual stream
        a_idx = torch.arange(0, L, 2, device=dev)  # sources: even positions (t[:, 0::2]), destinations: odd
        scores = metric[:, 0::2] @ metric[:, 1::2].transpose(1, 2)  # (batch, La, Lb)
        cls = state["cls"]
        rows = torch.arange(batch, device=dev)
        even = cls % 2 == 0
        neg = torch.finfo(scores.dtype).min
        scores[rows[even], cls[even] // 2, :] = neg  # the class token is never a source ...
        scores[rows[~even], :, cls[~even] // 2] = neg  # ... nor a destination
        node_max, node_idx = scores.max(dim=-1)  # best destination of each even token
        order = node_max.argsort(dim=-1, descending=True)
        src = order[:, :k]  # (batch, k) indices into the even positions
        dst = torch.gather(node_idx, 1, src)  # indices into the odd positions
        size = state["size"]
        s_src = torch.gather(size[:, 0::2], 1, src)  # (batch, k)
        mass = size[:, 1::2].scatter_add(1, dst, s_src)
        new_size = size.clone()
        new_size[:, 1::2] = mass
        tb = x[:, 1::2] * size[:, 1::2, None].to(x.dtype)
        contrib = _gather_tokens(x[:, 0::2], src) * s_src[..., None].to(x.dtype)
        tb = tb.scatter_add(1, dst[..., None].expand(-1, -1, x.shape[-1]), contrib) / mass[..., None].to(x.dtype)
        x = x.clone() if torch.is_grad_enabled() else x  # the stream belongs to this forward
        x[:, 1::2] = tb
        keep = torch.ones(batch, L, dtype=torch.bool, device=dev)
        keep.scatter_(1, a_idx[src], False)
        kept = _kept_from_mask(keep)
        return _gather_tokens(x, kept), _new_state(dict(state, size=new_size), kept)


class ToPReducer(Reducer):
    method = "top"

    def overhead_flops(self, cfg, L, k):
        return 2 * L * cfg.d_inner  # clipped channel sums of both directions' outputs (top-k not counted)

    def decay_scales(self, state):
        if not self.options["align"]:
            return None
        pos = state["pos"]
        if pos.shape[1] == 0 or bool((pos[:, -1] == pos.shape[1] - 1).all()):
            return None  # nothing pruned yet: plain decay
        gap = (pos[:, 1:] - pos[:, :-1]).to(torch.float32)
        one = torch.ones_like(gap[:, :1])
        return torch.cat([one, gap], dim=1), torch.cat([gap, one], dim=1)

    def step(self, i, k, x, state, stats):
        imp = sum(stats[d].y.clamp_min(0).sum(dim=1) for d in ("forward", "backward"))  # (batch, L)
        imp = imp.to(torch.promote_types(imp.dtype, torch.float32))
        rows = torch.arange(x.shape[0], device=x.device)
        imp[rows, state["cls"]] = float("inf")
        kept = imp.topk(x.shape[1] - k, dim=1).indices.sort(dim=1).values
        return _gather_tokens(x, kept), _new_state(state, kept)


def _class_row(delta, B, C_cls, A, S):
    """mean over channels of |alpha[d, cls, j]| = |delta_j sum_n C_cls[n] exp(A[d, n] S_j[d]) B_j[n]| (eq. 5).

    delta, S: (batch, E, J); B: (batch, N, J); C_cls: (batch, N); A: (E, N). One state at a time keeps
    memory at (batch, E, J); exp2 with A * log2(e) (faster than exp on CPU)."""
    CB = C_cls[:, :, None] * B  # (batch, N, J)
    A2 = A * _LOG2E
    alpha = torch.zeros_like(S)
    for n in range(A.shape[1]):
        alpha.addcmul_(torch.mul(A2[None, :, n, None], S).exp2_(), CB[:, n, None, :])
    return alpha.mul_(delta).abs_().mean(dim=1)


def class_attention(stats, cls):
    """|alpha[d, cls, j]| averaged over channels d (eq. 5), forward direction for j < cls, backward for j > cls.

    stats: MambaMixer.stats (position order); cls: (batch,) indices. Returns (batch, L); 0 at cls.
    Each direction reads only the positions on its side of the class tokens (positions up to max(cls)
    forward, from min(cls) backward): half the work of a masked whole-sequence computation.
    """
    f, b = stats["forward"], stats["backward"]
    batch, L = cls.shape[0], f.L
    lo, hi = int(cls.min()), int(cls.max())
    c = cls[:, None, None]
    out = torch.zeros(batch, L, dtype=f.bias.dtype, device=cls.device)
    if hi > 0:  # forward, j < cls: S_j = delta summed over steps j+1 .. cls
        pos = torch.arange(0, hi + 1, device=cls.device)
        delta = f.delta_at(pos)  # (batch, E, hi + 1)
        cz = torch.cumsum(delta, dim=-1)
        S = (torch.gather(cz, 2, c.expand(-1, cz.shape[1], 1)) - cz[:, :, :hi]).clamp_min_(0)
        C_cls = torch.gather(f.C_at(pos), 2, c.expand(-1, f.A.shape[1], 1))[:, :, 0].to(delta.dtype)
        row = _class_row(delta[:, :, :hi], f.B_at(pos[:hi]).to(delta.dtype), C_cls, f.A, S)
        out[:, :hi] = row if lo == hi else row * (pos[None, :hi] < cls[:, None])
    if lo < L - 1:  # backward, j > cls: S_j = delta summed over steps cls .. j-1
        pos = torch.arange(lo, L, device=cls.device)
        delta = b.delta_at(pos)  # (batch, E, L - lo)
        cz = torch.nn.functional.pad(torch.cumsum(delta, dim=-1), (1, 0))  # cz[k] = sum of delta[lo .. lo+k-1]
        S = (cz[:, :, 1:-1] - torch.gather(cz, 2, (c - lo).expand(-1, cz.shape[1], 1))).clamp_min_(0)
        C_cls = torch.gather(b.C_at(pos), 2, (c - lo).expand(-1, b.A.shape[1], 1))[:, :, 0].to(delta.dtype)
        row = _class_row(delta[:, :, 1:], b.B_at(pos[1:]).to(delta.dtype), C_cls, b.A, S)
        out[:, lo + 1:] += row if lo == hi else row * (pos[None, 1:] > cls[:, None])  # sides overlap unless lo == hi
    return out


class EViTReducer(Reducer):
    method = "evit"

    def overhead_flops(self, cfg, L, k):
        # class-token attention: exp(A * S) times C_cls and B over (E, N) for every token, both sides
        return 3 * L * cfg.d_inner * cfg.d_state + (k + 1) * cfg.embed_dim

    def step(self, i, k, x, state, stats):
        batch, L, _ = x.shape
        rows = torch.arange(batch, device=x.device)
        imp = class_attention(stats, state["cls"])
        imp = imp.to(torch.promote_types(imp.dtype, torch.float32))  # float64 models keep float64 weights
        imp[rows, state["cls"]] = float("inf")
        order = imp.argsort(dim=1)  # ascending importance
        pruned = order[:, : k + 1]  # (batch, k+1), least important first
        host = pruned[:, -1]  # the most important of them hosts the fused token
        w = torch.gather(imp, 1, pruned)
        w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
        w = w / w.sum(dim=1, keepdim=True)

        fused = (_gather_tokens(x, pruned) * w[..., None].to(x.dtype)).sum(dim=1)
        x = x.clone() if torch.is_grad_enabled() else x  # the stream belongs to this forward
        x[rows, host] = fused
        keep = torch.ones(batch, L, dtype=torch.bool, device=x.device)
        keep.scatter_(1, pruned[:, :-1], False)
        kept = _kept_from_mask(keep)
        return _gather_tokens(x, kept), _new_state(state, kept)


_TOME_LAYERS = ("all", "every_other", "lower", "upper")


def _tome_setup(model, options):
    opts = _check_options("tome", options, dict(layers="every_other"))
    depth = model.cfg.depth
    choice = opts["layers"]
    if isinstance(choice, str):
        if choice not in _TOME_LAYERS:
            raise ValueError(f"tome: layers must be one of {_TOME_LAYERS} or a list of layer indices, got {choice!r}")
        layers = {"all": range(depth - 1), "every_other": range(1, depth - 1, 2),
                  "lower": range(0, depth // 2), "upper": range(depth // 2, depth - 1)}[choice]
    else:
        layers = choice
    return opts, _check_layers("tome", layers, depth), 1, model.cfg.num_patches - 1


def _check_layers(method, layers, depth):
    layers = sorted(int(l) for l in layers)
    bad = [l for l in layers if not 0 <= l <= depth - 2]
    if bad:
        raise ValueError(f"{method}: layers {bad} out of range: reductions happen after layers 0..{depth - 2}")
    return layers


def default_prune_layers(depth):
    """ToP-ViM prunes after 0-based layers 4, 9, 14 of 24; other depths get the same fractions of the depth."""
    return sorted({min(max(round(depth * f / 24) - 1, 0), depth - 2) for f in (5, 10, 15)})


def _prune_setup(method, model, options, extra):
    opts = _check_options(method, options, dict(layers=None, **extra))
    if opts["layers"] is None:
        opts["layers"] = default_prune_layers(model.cfg.depth)
    return opts, _check_layers(method, opts["layers"], model.cfg.depth), 1, model.cfg.num_patches - 1


def _top_setup(model, options):
    return _prune_setup("top", model, options, dict(align=True))


def _evit_setup(model, options):
    return _prune_setup("evit", model, options, {})


METHODS = {"tome": (_tome_setup, ToMeReducer), "top": (_top_setup, ToPReducer), "evit": (_evit_setup, EViTReducer)}
