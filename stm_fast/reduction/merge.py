"""STM's merge in PyTorch, batched (eq. 11; docs/conventions.md §3-4); reference twin: ``stm_ref.merge``.

A merge step happens between two layers. The plan (which tokens go where) is the same for every image
and comes from ``stm_ref.merge.merge_plan``, cached as index tensors. The weights depend on the image:
they are computed from the statistics the layer just run already produced (per-token delta after
softplus, B, and A of each direction), with Mamba's Euler discretisation Abar = exp(delta*A),
Bbar = delta*B (what its kernels compute). Left-side tokens use the forward direction, right-side
tokens the backward direction, all indexed by token position.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from stm_ref.merge import CONSTANT_VARIANTS, JOINT_RIDGE, NORMALISED_VARIANTS, TOKEN_WEIGHT_VARIANTS, merge_plan, noise_row

from ..ops.common import LOG2E
from ..ssm import compiled_ends_lsq

__all__ = ["PlanIndex", "plan_index", "token_weights", "ends_weights", "merge_tokens", "merge_ends", "size_weights",
           "merged_sizes", "TOKEN_WEIGHT_VARIANTS", "CONSTANT_VARIANTS", "NORMALISED_VARIANTS"]


@dataclass(frozen=True)
class PlanIndex:
    """Index tensors of one BNNM plan: kept positions, reduced positions, each reduced token's target as an
    index into the kept sequence, which side it is on, and the class token's new index."""

    L: int
    cls: int
    kept: torch.Tensor  # (K,)
    reduced: torch.Tensor  # (R,)
    target: torch.Tensor  # (R,) positions
    target_k: torch.Tensor  # (R,) indices into kept
    left: torch.Tensor  # (R,) bool
    new_cls: int
    sides: tuple = ()  # SideIndex per side with reductions (left first), for the weights
    ends: tuple = None  # (r_left, r_right) for the ``ends`` plan: each side's reduced tokens are the first
    # r scan steps of its direction and its target is step r, so the weights read slices, not gathers
    kept_range: tuple = None  # (start, stop) when the kept positions are one contiguous run

    def take(self, t):
        """t[:, kept] for t (batch, L, ...): a view when the kept positions are contiguous."""
        if self.kept_range is not None:
            return t[:, self.kept_range[0]:self.kept_range[1]]
        return t.index_select(1, self.kept)


@dataclass(frozen=True)
class SideIndex:
    """Where one side's weights read the layer statistics: the span of positions between its reduced tokens
    and their targets, the reduced/target tokens as indices into that span, and the two prefix-sum indices
    whose difference is the sum of delta over the steps after j up to and including q in scan order."""

    forward: bool
    span: torch.Tensor
    j: torch.Tensor
    q: torch.Tensor
    upper: torch.Tensor
    lower: torch.Tensor


def _side_index(j, q, forward):
    lo = int(min(j.min(), q.min()))
    hi = int(max(j.max(), q.max()))
    jl, ql = j - lo, q - lo
    # with cz[t] = sum of delta[span[:t]]: forward sums steps j+1..q, backward steps q..j-1
    upper, lower = (ql + 1, jl + 1) if forward else (jl, ql)
    return SideIndex(forward, torch.arange(lo, hi + 1), jl, ql, upper, lower)


@lru_cache(maxsize=512)
def _plan_cpu(L, cls, r_left, r_right, positions):
    p = merge_plan(L, cls, r_left, r_right, positions)
    kept = torch.as_tensor(p.kept, dtype=torch.long)
    reduced = torch.as_tensor(p.reduced, dtype=torch.long)
    target = torch.as_tensor(p.target, dtype=torch.long)
    target_k = torch.searchsorted(kept, target)
    left = reduced < cls
    sides = tuple(_side_index(reduced[m], target[m], fwd) for m, fwd in ((left, True), (~left, False)) if bool(m.any()))
    contiguous = len(kept) > 0 and int(kept[-1]) - int(kept[0]) + 1 == len(kept)
    kept_range = (int(kept[0]), int(kept[-1]) + 1) if contiguous else None
    return PlanIndex(L, cls, kept, reduced, target, target_k, left, p.new_cls, sides,
                     (r_left, r_right) if positions == "ends" else None, kept_range)


_DEVICE_CACHE = {}


def plan_index(L, cls, r_left, r_right, positions="ends", device="cpu"):
    """Cached index tensors of ``stm_ref.merge.merge_plan(L, cls, r_left, r_right, positions)`` on ``device``."""
    key = (L, cls, r_left, r_right, positions, str(device))
    if key not in _DEVICE_CACHE:
        p = _plan_cpu(L, cls, r_left, r_right, positions)
        if torch.device(device).type != "cpu":
            sides = tuple(SideIndex(sd.forward, *(t.to(device) for t in (sd.span, sd.j, sd.q, sd.upper, sd.lower)))
                          for sd in p.sides)
            p = PlanIndex(p.L, p.cls, *(t.to(device) for t in (p.kept, p.reduced, p.target, p.target_k, p.left)),
                          p.new_cls, sides, p.ends, p.kept_range)
        _DEVICE_CACHE[key] = p
    return _DEVICE_CACHE[key]


def _filled(stats, R, value):
    """(batch, R) weights all equal to ``value`` (``avg``: 1, ``drop``: 0, or an empty side), in the statistics' dtype."""
    f = stats.forward
    return torch.full((f.delta_raw.shape[0], R), value, dtype=f.bias.dtype, device=f.delta_raw.device)


_CONSTANT = {"avg": 1.0, "drop": 0.0, "noise": 1.0}  # weight variants that need no statistics
_NOISE_CACHE: dict = {}


def _noise_rows(L, targets, C, dtype, device):
    """``stm_ref.merge.noise_row`` of each input index in ``targets`` (a tuple), as a (len, C) tensor (cached)."""
    key = (L, targets, C, dtype, str(device))
    if key not in _NOISE_CACHE:
        rows = np.stack([noise_row(L, q, C) for q in targets])
        _NOISE_CACHE[key] = torch.as_tensor(rows, dtype=dtype, device=device)
    return _NOISE_CACHE[key]


def _replace_by_noise(out, L, targets, slots):
    """The noise control: rows ``slots`` of out (batch, K, C), the merged tokens of input indices ``targets``,
    replaced in place by their noise rows scaled to each row's own root mean square."""
    if not len(slots):
        return out
    rows = out[:, list(slots)]
    scale = rows.pow(2).mean(dim=-1, keepdim=True).sqrt()
    out[:, list(slots)] = _noise_rows(L, tuple(targets), out.shape[-1], out.dtype, out.device) * scale
    return out


def _decay_products(A2, S):
    """P = exp(A * S) = exp2(A2 * S): (..., R, N, E) from S (..., R, E) and A2 = A * log2(e) as (N, E)."""
    return torch.mul(A2, S[..., None, :]).exp2_()


def _weights_from(variant, P, dj, dq, Bj, Bq, clamp):
    """Per reduced token j -> target q, the scalar weight of docs/conventions.md §4 from that direction's statistics.

    ``P`` (..., N, E): P_{j->q} = exp(A * the sum of delta over the steps after j up to and including q in
    scan order) (eq. 11); ``dj, dq`` (..., E): delta; ``Bj, Bq`` (..., N): B (leading axes broadcast);
    Bbar = delta (x) B. Channels are the last, contiguous axis throughout, so every op is a row-wise vector
    op and the sum over states is one small matrix product.
    """
    if variant == "decay":
        return P.mean(dim=(-2, -1))
    if variant in ("lsq", "lsq_norm"):
        # <P*Bbar_j, Bbar_q>_F / |Bbar_q|_F^2 with Bbar = delta (x) B: sum over N first, the denominator factorises
        inner = torch.matmul((Bj * Bq)[..., None, :], P)[..., 0, :]  # (..., E)
        num = torch.linalg.vecdot(inner, dj * dq)
        den = torch.linalg.vecdot(dq, dq) * torch.linalg.vecdot(Bq, Bq)
        w = num / den.clamp_min(torch.finfo(den.dtype).tiny)  # den = 0 only if Bbar_q = 0, and then num = 0 too
        return w.clamp(0.0, 1.0) if variant == "lsq_norm" else w
    if variant == "mean":
        Bbar_j = dj[..., None, :] * Bj[..., :, None]  # (..., N, E)
        Bbar_q = dq[..., None, :] * Bq[..., :, None]
        floor = clamp * Bbar_q.abs().amax(dim=(-2, -1), keepdim=True)
        sign = torch.where(Bbar_q < 0, -1.0, 1.0).to(P.dtype)
        den = sign * torch.maximum(Bbar_q.abs(), floor)
        w = (P * Bbar_j / torch.where(floor > 0, den, torch.ones_like(den))).mean(dim=(-2, -1))
        return torch.where(floor[..., 0, 0] > 0, w, torch.zeros_like(w))
    raise ValueError(f"weights must be one of {TOKEN_WEIGHT_VARIANTS}, got {variant!r}")


def _side_weights(st, side, variant, clamp):
    """Scalar weights (batch, R_side) for one side's reduced tokens, from that direction's statistics.

    ``st``: a ``DirectionStats``; ``side``: its ``SideIndex``. Only the positions between the reduced
    tokens and their targets are read.
    """
    d = st.delta_rows(side.span)  # (batch, span, E)
    if variant in _CONSTANT:
        return torch.full((d.shape[0], len(side.j)), _CONSTANT[variant], dtype=d.dtype, device=d.device)
    cz = torch.nn.functional.pad(torch.cumsum(d, dim=1), (0, 0, 1, 0))
    S = cz.index_select(1, side.upper) - cz.index_select(1, side.lower)  # (batch, R, E)
    Bs = st.B_rows(side.span).to(d.dtype)  # (batch, span, N)
    P = _decay_products(st.A.t() * LOG2E, S)
    return _weights_from(variant, P, d.index_select(1, side.j), d.index_select(1, side.q),
                         Bs.index_select(1, side.j), Bs.index_select(1, side.q), clamp)


def _lsq_from_first_steps(P, d, Bh, r, variant):
    """``lsq``/``lsq_norm`` weights (r, sides, batch) from step-major P (r, sides, batch, N, E), delta
    (r + 1, sides, batch, E) and B (r + 1, sides, batch, N): ``_weights_from``'s arithmetic written as
    batched small matrix products on these fixed shapes. A deliberate twin of that branch (tests compare
    them): inside a forward the STM step is dominated by per-call overhead (each torch call costs a few
    microseconds on a CPU whatever its size), so this path makes as few calls as it can; folding both
    into one shape-generic function made the step measurably slower inside forwards."""
    _, s, b, N, E = P.shape
    G = r * s * b
    dq, Bq = d[r], Bh[r]
    inner = torch.bmm(torch.mul(Bh[:r], Bq).view(G, 1, N), P.reshape(G, N, E))  # sum over N of P*Bj*Bq
    num = torch.linalg.vecdot(inner.view(r, s, b, E), torch.mul(d[:r], dq))
    den = torch.linalg.vecdot(dq, dq).mul_(torch.linalg.vecdot(Bq, Bq))  # |Bbar_q|_F^2 = |delta_q|^2 |B_q|^2
    w = num.div_(den.clamp_min_(torch.finfo(den.dtype).tiny))  # den = 0 only if Bbar_q = 0, and then num = 0 too
    return w.clamp_(0.0, 1.0) if variant == "lsq_norm" else w


def _stacked_ends_weights(sts, r, variant, clamp, first=None):
    """Weights (len(sts), batch, r) of the ``ends`` plan, in each direction's scan order.

    There a side's reduced tokens are its direction's first r scan steps and their common target is
    step r, so only the first r + 1 rows of each direction are read (slices, no gathers), and the
    directions of both sides stack along a leading axis: one set of small kernels for the whole step.
    P_j = Abar_{j+1} ... Abar_r. ``first``: the scan's own delta (n, sides, batch, E), Abar
    (n, sides, batch, N, E) and B (n, sides, batch, N) or None, of the first n > r steps
    (``LayerStats.first_steps``), reused (no exp; the Abar buffer is overwritten with P); without
    them, delta and P are recomputed from the statistics. (A compiled kernel, where one takes the first
    steps, is tried before: ``_compiled_pair_weights``.)
    """
    if variant == "lsq_joint":
        return _joint_ends_weights(sts, r)
    if first is not None:  # step-major: (step, sides, batch, ...), so the slices below are contiguous
        d, a, Bh = first
        rows = a.unbind(0)
        for j in range(r - 1, 0, -1):  # suffix products in place; r is a few tokens (cumprod is slower)
            torch.mul(rows[j], rows[j + 1], out=rows[j])
        P = a[1:r + 1]
        if Bh is None:
            Bh = torch.stack([st.first_B(r + 1) for st in sts], dim=1)
        if Bh.dtype != d.dtype:
            Bh = Bh.to(d.dtype)
        if variant in ("lsq", "lsq_norm"):
            w = _lsq_from_first_steps(P, d, Bh, r, variant)
        else:
            w = _weights_from(variant, P, d[:r], d[r:r + 1], Bh[:r], Bh[r:r + 1], clamp)  # (r, sides, batch)
        return w.permute(1, 2, 0).contiguous()  # contiguous rows: bmm on strided operands loops per image
    d, B, P = _ends_decays(sts, r)
    return _weights_from(variant, P, d[:, :, :r], d[:, :, r:], B[:, :, :r], B[:, :, r:], clamp)


def _ends_decays(sts, r):
    """delta (sides, batch, r + 1, E), B (same, N) of the first r + 1 scan steps and P_j = Abar_{j+1} .. Abar_r
    (sides, batch, r, N, E), recomputed from the statistics."""
    rows = [st.scan_rows(r + 1) for st in sts]
    d = torch.stack([dr for dr, _ in rows])
    B = torch.stack([Br for _, Br in rows]).to(d.dtype)
    dd = d[:, :, 1:]
    c = dd.cumsum(2)
    S = c[:, :, -1:] - c + dd  # S_j = delta summed over steps j+1 .. r
    A2 = torch.stack([st.A for st in sts]).transpose(1, 2)[:, None, None] * LOG2E  # (sides, 1, 1, N, E)
    return d, B, _decay_products(A2, S)


def _joint_ends_weights(sts, r):
    """``lsq_joint`` weights (sides, batch, r) of the ``ends`` plan (twin of ``stm_ref.merge.joint_weights``):
    the r weights of each side fitted together to the loss at the merge point, sum_j (w_j Bbar_q - P_j Bbar_j) u_j,
    with Bbar = delta (x) B, by their r x r normal equations (the ridge as in the reference)."""
    d, B, P = _ends_decays(sts, r)
    u = torch.stack([st.scan_u_rows(r + 1) for st in sts]).to(d.dtype)  # (sides, batch, r + 1, E)
    dq, Bq, dj, Bj, uj = d[:, :, r], B[:, :, r], d[:, :, :r], B[:, :, :r], u[:, :, :r]
    # T = sum_k P_k Bbar_k u_k (N, E); b_j = <Bbar_q u_j, T>; G_jk = |B_q|^2 sum_e dq^2 u_j u_k
    T = torch.einsum("sbkne,sbkn,sbke->sbne", P, Bj, dj * uj)
    b = torch.einsum("sbne,sbn,sbje->sbj", T, Bq, dq[:, :, None] * uj)
    G = torch.einsum("sbje,sbke->sbjk", uj * dq[:, :, None], uj * dq[:, :, None]) * (Bq * Bq).sum(-1)[..., None, None]
    diag = torch.diagonal(G, dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(G.dtype).tiny)
    eye = torch.eye(r, dtype=G.dtype, device=G.device)
    # solve_ex: solve without its error check, which reads LAPACK's info back from the device (a host sync); the
    # ridge keeps the system regular unless G is 0, where the weights come out non-finite instead of an error
    return torch.linalg.solve_ex(G + JOINT_RIDGE * diag[..., None, None] * eye, b[..., None])[0][..., 0]


def _compiled_pair_weights(pair, r, variant):
    """(forward, backward) lsq weights (batch, r) in scan order by a compiled kernel that takes each
    direction's first steps as they are (no stacking copy), or None where none takes them."""
    if r == 0 or variant not in ("lsq", "lsq_norm") or any(f.B is None for f in pair):
        return None
    kernel = compiled_ends_lsq([t for f in pair for t in (f.delta, f.Abar, f.B)])
    if kernel is None:
        return None
    return tuple(kernel(f.delta[:, None], f.Abar[:, None], f.B[:, None].to(f.delta.dtype), r, variant == "lsq_norm")[0]
                 for f in pair)


def _one_side(stats, i, r, variant, clamp, enough):
    """Weights (batch, r) of one side's direction (i = 0: forward, 1: backward), in its scan order; with
    ``enough`` first steps, that direction's own (as a one-side stack, no copy)."""
    direction = stats.forward if i == 0 else stats.backward
    f = stats.first_pair[i] if enough else None
    sub = None if f is None else (f.delta[:, None], f.Abar[:, None], None if f.B is None else f.B[:, None])
    return _stacked_ends_weights([direction], r, variant, clamp, sub)[0]


def ends_weights(stats, r_left, r_right, variant="lsq", clamp=1e-6):
    """Weights of the ``ends`` plan as (left (batch, r_left), right (batch, r_right)), each in token
    position order; what ``token_weights`` returns for that plan, split by side. ``stats.first_steps`` (the
    scan's exported first steps), when present, is used and consumed: its Abar buffer is overwritten."""
    if variant in _CONSTANT:
        return _filled(stats, r_left, _CONSTANT[variant]), _filled(stats, r_right, _CONSTANT[variant])
    enough = stats.first_pair is not None and stats.first_pair[0].delta.shape[0] > max(r_left, r_right)
    compiled = _compiled_pair_weights(stats.first_pair, r_left, variant) if enough and r_left == r_right else None
    if compiled is not None:
        left, right = compiled
    elif r_left == r_right and r_left > 0:
        w = _stacked_ends_weights([stats.forward, stats.backward], r_left, variant, clamp,
                                  stats.first_steps if enough else None)
        left, right = w[0], w[1]
    else:
        left = _one_side(stats, 0, r_left, variant, clamp, enough) if r_left else _filled(stats, 0, 0.0)
        right = _one_side(stats, 1, r_right, variant, clamp, enough) if r_right else _filled(stats, 0, 0.0)
    return left, right.flip(-1)  # right-side tokens in position order are the backward scan's steps reversed


def token_weights(stats, plan, variant="lsq", clamp=1e-6):
    """One scalar weight per reduced token and image, (batch, R) in plan order (docs/conventions.md §4; eq. 11
    with the statistics of the layer just run). ``stats``: the layer's ``LayerStats``. Twin of ``stm_ref.merge.token_weights`` applied with the Euler
    Abar/Bbar of each direction. ``stats.first_steps`` is consumed (its Abar buffer is overwritten)."""
    if variant not in TOKEN_WEIGHT_VARIANTS:
        raise ValueError(f"weights must be one of {TOKEN_WEIGHT_VARIANTS}, got {variant!r}")
    if plan.ends is not None:
        return torch.cat(ends_weights(stats, *plan.ends, variant, clamp), dim=1)  # left tokens precede right ones
    if not plan.sides:
        return _filled(stats, 0, 0.0)
    parts = [_side_weights(stats.direction(sd.forward), sd, variant, clamp) for sd in plan.sides]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # left tokens precede right ones


def merge_ends(x, r_left, r_right, w_left, w_right, variant="lsq", inplace=False):
    """``merge_tokens`` for the ``ends`` plan: the first r_left tokens (weights w_left (batch, r_left)) go
    into the first kept token, the last r_right (w_right, position order) into the last kept one;
    (batch, L, C) -> (batch, L - r_left - r_right, C). One small matrix product per side. ``inplace``:
    the result is a view of x, updated in place."""
    L = x.shape[1]
    out = x[:, r_left:L - r_right]
    if not inplace:
        out = out.clone()
    if variant == "drop":
        return out
    for r, w, src, tgt in ((r_left, w_left, x[:, :r_left], out[:, :1]), (r_right, w_right, x[:, L - r_right:], out[:, -1:])):
        if r:
            w = w.to(x.dtype)
            tgt.add_(torch.bmm(w[:, None, :], src))
            if variant in NORMALISED_VARIANTS:
                tgt.div_((1 + w.sum(1))[:, None, None])
    if variant == "noise":
        ends = [(q, k) for r, q, k in ((r_left, r_left, 0), (r_right, L - 1 - r_right, out.shape[1] - 1)) if r]
        _replace_by_noise(out, L, [q for q, _ in ends], [k for _, k in ends])
    return out


def merge_tokens(x, plan, weights, variant="lsq", inplace=False):
    """Merge tokens x (batch, L, C) by the plan with weights (batch, R); returns (batch, K, C). Twin of
    ``stm_ref.merge.merge_tokens``: x*_q = x_q + sum_j w_j x_j; normalised by 1 + sum_j w_j for
    ``NORMALISED_VARIANTS`` (lsq_norm, avg, size); ``drop`` keeps x_q. One gather and one index_add (``merge_ends`` for the ends plan), no
    loop over tokens or images. ``inplace``: when the kept tokens are contiguous (the ``ends`` plan) the
    result is a view of x, updated in place (x's kept rows change); the reducers use it on streams the
    forward owns."""
    if plan.ends is not None:
        rl, rr = plan.ends
        w = (None, None) if weights is None else (weights[:, :rl], weights[:, rl:])
        return merge_ends(x, rl, rr, *w, variant, inplace)
    out = plan.take(x)  # a view when the kept tokens are contiguous, else a fresh gather
    if plan.kept_range is not None and not inplace:
        out = out.clone()
    if variant == "drop" or len(plan.reduced) == 0:
        return out
    w = weights.to(x.dtype)
    out.index_add_(1, plan.target_k, x.index_select(1, plan.reduced) * w[..., None])
    if variant in NORMALISED_VARIANTS:
        mass = torch.ones(x.shape[0], len(plan.kept), dtype=x.dtype, device=x.device).index_add_(1, plan.target_k, w)
        out = out / mass[..., None]
    if variant == "noise":  # the control only: reading the plan's targets on the host is no method's cost
        pairs = sorted(set(zip(plan.target.cpu().tolist(), plan.target_k.cpu().tolist())))
        _replace_by_noise(out, x.shape[1], [q for q, _ in pairs], [k for _, k in pairs])
    return out


def size_weights(size, plan):
    """``size`` weights size_j / size_q (ToMe's size-weighted average once normalised), (batch, R) in plan
    order (left tokens first), from the tokens' sizes (batch, L) (twin: ``stm_ref.merge.token_weights``)."""
    if plan.ends is not None:
        rl, rr = plan.ends
        L = size.shape[1]
        return torch.cat([size[:, :rl] / size[:, rl:rl + 1], size[:, L - rr:] / size[:, L - rr - 1:L - rr]], dim=1)
    return size.index_select(1, plan.reduced) / size.index_select(1, plan.target)


def merged_sizes(size, plan, variant):
    """The sizes (batch, K) after the plan: each kept token's plus those merged into it (kept as is for ``drop``)."""
    out = plan.take(size).clone()
    if variant != "drop" and len(plan.reduced):
        out.index_add_(1, plan.target_k, size.index_select(1, plan.reduced))
    return out
