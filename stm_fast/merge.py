"""STM's merge in PyTorch, batched (eq. 11, SPEC §3-4); reference twin: ``stm_ref.merge``.

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

import torch

from stm_ref.merge import TOKEN_WEIGHT_VARIANTS, merge_plan

_LOG2E = 1.4426950408889634

__all__ = ["PlanIndex", "plan_index", "token_weights", "merge_tokens", "TOKEN_WEIGHT_VARIANTS"]


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
    stacked: torch.Tensor = None  # (4, 2, R) upper/lower/j/q of both sides when they mirror each other


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
    stacked = None
    if len(sides) == 2 and len(sides[0].j) == len(sides[1].j) and len(sides[0].span) == len(sides[1].span):
        stacked = torch.stack([torch.stack([sd.upper, sd.lower, sd.j, sd.q]) for sd in sides], dim=1)
    return PlanIndex(L, cls, kept, reduced, target, target_k, left, p.new_cls, sides, stacked)


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
                          p.new_cls, sides, None if p.stacked is None else p.stacked.to(device))
        _DEVICE_CACHE[key] = p
    return _DEVICE_CACHE[key]


def _side_weights(st, side, variant, clamp):
    """Scalar weights (batch, R_side) for one side's reduced tokens, from that direction's statistics.

    ``st``: a ``DirectionStats``; ``side``: its ``SideIndex``. P_{j->q} = exp(A * the sum of delta over the
    steps after j up to and including q in scan order); Bbar = delta * B. Only the positions between the
    reduced tokens and their targets are read.
    """
    d = st.delta_at(side.span)  # (batch, E, span)
    batch = d.shape[0]
    R = len(side.j)
    if variant in ("avg", "drop"):
        return torch.full((batch, R), 1.0 if variant == "avg" else 0.0, dtype=d.dtype, device=d.device)
    cz = torch.nn.functional.pad(torch.cumsum(d, dim=-1), (1, 0))
    S = cz.index_select(2, side.upper) - cz.index_select(2, side.lower)  # (batch, E, R)
    P = torch.mul((st.A * _LOG2E)[None, :, :, None], S[:, :, None, :]).exp2_()  # (batch, E, N, R)
    if variant == "decay":
        return P.mean(dim=(1, 2))
    dj, dq = d.index_select(2, side.j), d.index_select(2, side.q)  # (batch, E, R)
    Bs = st.B_at(side.span).to(d.dtype)
    Bj, Bq = Bs.index_select(2, side.j), Bs.index_select(2, side.q)  # (batch, N, R)
    if variant in ("lsq", "lsq_norm"):
        # <P*Bbar_j, Bbar_q>_F / |Bbar_q|_F^2 with Bbar = delta (x) B: sum over N first, the denominator factorises
        num = (P.mul_((Bj * Bq)[:, None]).sum(dim=2) * (dj * dq)).sum(dim=1)
        den = (dq * dq).sum(dim=1) * (Bq * Bq).sum(dim=1)
        w = num / den.clamp_min(torch.finfo(den.dtype).tiny)  # den = 0 only if Bbar_q = 0, and then num = 0 too
        return w.clamp(0.0, 1.0) if variant == "lsq_norm" else w
    if variant == "mean":
        Bbar_j = dj[:, :, None, :] * Bj[:, None, :, :]  # (batch, E, N, R)
        Bbar_q = dq[:, :, None, :] * Bq[:, None, :, :]
        floor = clamp * Bbar_q.abs().amax(dim=(1, 2), keepdim=True)
        sign = torch.where(Bbar_q < 0, -1.0, 1.0).to(d.dtype)
        den = sign * torch.maximum(Bbar_q.abs(), floor)
        w = (P * Bbar_j / torch.where(floor > 0, den, torch.ones_like(den))).mean(dim=(1, 2))
        return torch.where(floor[:, 0, 0, :] > 0, w, torch.zeros_like(w))
    raise ValueError(f"weights must be one of {TOKEN_WEIGHT_VARIANTS}, got {variant!r}")


def _both_sides_lsq(stats, plan, variant):
    """``lsq``/``lsq_norm`` weights of both sides at once when they mirror each other (same number of reduced
    tokens, same span length: the default ``ends`` plan), stacking the two directions along a new axis so the
    step runs half as many small kernels. Same arithmetic as ``_side_weights``."""
    left, right = plan.sides
    f, b = stats["forward"], stats["backward"]
    d = torch.stack([f.delta_at(left.span), b.delta_at(right.span)])  # (2, batch, E, S)
    two, batch, E, _ = d.shape
    R = len(left.j)
    idx = plan.stacked  # (4, 2, R): upper, lower, j, q
    cz = torch.nn.functional.pad(torch.cumsum(d, dim=-1), (1, 0))
    take = lambda t, i: torch.gather(t, 3, i[:, None, None, :].expand(two, batch, t.shape[2], R))  # noqa: E731
    S = take(cz, idx[0]) - take(cz, idx[1])  # (2, batch, E, R)
    A2 = torch.stack([f.A, b.A]) * _LOG2E  # (2, E, N)
    P = torch.mul(A2[:, None, :, :, None], S[:, :, :, None, :]).exp2_()  # (2, batch, E, N, R)
    Bs = torch.stack([f.B_at(left.span), b.B_at(right.span)]).to(d.dtype)  # (2, batch, N, S)
    dj, dq, Bj, Bq = take(d, idx[2]), take(d, idx[3]), take(Bs, idx[2]), take(Bs, idx[3])
    num = (P.mul_((Bj * Bq)[:, :, None]).sum(dim=3) * (dj * dq)).sum(dim=2)  # (2, batch, R)
    den = (dq * dq).sum(dim=2) * (Bq * Bq).sum(dim=2)
    w = num / den.clamp_min(torch.finfo(den.dtype).tiny)
    if variant == "lsq_norm":
        w = w.clamp(0.0, 1.0)
    return w.permute(1, 0, 2).reshape(batch, 2 * R)  # left tokens first, as the plan orders them


def token_weights(stats, plan, variant="lsq", clamp=1e-6):
    """One scalar weight per reduced token and image, (batch, R) in plan order (SPEC §4; eq. 11 with the
    statistics of the layer just run). ``stats``: {"forward": DirectionStats, "backward": DirectionStats}
    as ``MambaMixer.stats`` holds them. Twin of ``stm_ref.merge.token_weights`` applied with the Euler
    Abar/Bbar of each direction."""
    if variant not in TOKEN_WEIGHT_VARIANTS:
        raise ValueError(f"weights must be one of {TOKEN_WEIGHT_VARIANTS}, got {variant!r}")
    if variant in ("lsq", "lsq_norm") and plan.stacked is not None:
        return _both_sides_lsq(stats, plan, variant)
    parts = [_side_weights(stats["forward" if sd.forward else "backward"], sd, variant, clamp) for sd in plan.sides]
    if not parts:
        f = stats["forward"]
        return torch.empty(f.delta_raw.shape[0], 0, dtype=f.bias.dtype, device=f.delta_raw.device)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # left tokens precede right ones


def merge_tokens(x, plan, weights, variant="lsq"):
    """Merge tokens x (batch, L, C) by the plan with weights (batch, R); returns (batch, K, C). Twin of
    ``stm_ref.merge.merge_tokens``: x*_q = x_q + sum_j w_j x_j; normalised by 1 + sum_j w_j for ``lsq_norm``
    and ``avg``; ``drop`` keeps x_q. One gather and one index_add, no loop over tokens or images."""
    out = x.index_select(1, plan.kept)
    if variant == "drop" or len(plan.reduced) == 0:
        return out
    w = weights.to(x.dtype)
    out = out.index_add(1, plan.target_k, x.index_select(1, plan.reduced) * w[..., None])
    if variant in ("lsq_norm", "avg"):
        mass = torch.ones(x.shape[0], len(plan.kept), dtype=x.dtype, device=x.device).index_add(1, plan.target_k, w)
        out = out / mass[..., None]
    return out
