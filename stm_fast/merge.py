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


@lru_cache(maxsize=512)
def _plan_cpu(L, cls, r_left, r_right, positions):
    p = merge_plan(L, cls, r_left, r_right, positions)
    kept = torch.as_tensor(p.kept, dtype=torch.long)
    reduced = torch.as_tensor(p.reduced, dtype=torch.long)
    target = torch.as_tensor(p.target, dtype=torch.long)
    target_k = torch.searchsorted(kept, target)
    return PlanIndex(L, cls, kept, reduced, target, target_k, reduced < cls, p.new_cls)


_DEVICE_CACHE = {}


def plan_index(L, cls, r_left, r_right, positions="ends", device="cpu"):
    """Cached index tensors of ``stm_ref.merge.merge_plan(L, cls, r_left, r_right, positions)`` on ``device``."""
    key = (L, cls, r_left, r_right, positions, str(device))
    if key not in _DEVICE_CACHE:
        p = _plan_cpu(L, cls, r_left, r_right, positions)
        if torch.device(device).type != "cpu":
            p = PlanIndex(p.L, p.cls, *(t.to(device) for t in (p.kept, p.reduced, p.target, p.target_k, p.left)), p.new_cls)
        _DEVICE_CACHE[key] = p
    return _DEVICE_CACHE[key]


def _side_weights(st, j, q, forward, variant, clamp):
    """Scalar weights (batch, R) for reduced positions j merging into q, from one direction's statistics.

    ``st``: a ``DirectionStats`` (or anything with ``delta_at``, ``B_at``, ``A``). P_{j->q} = exp(A * the sum
    of delta over the steps after j up to and including q in scan order); Bbar = delta * B. Only the
    positions between the reduced tokens and their targets are read.
    """
    lo = int(torch.minimum(j, q).min())
    hi = int(torch.maximum(j, q).max())
    span = torch.arange(lo, hi + 1, device=j.device)
    d = st.delta_at(span)  # (batch, E, span)
    batch = d.shape[0]
    if variant in ("avg", "drop"):
        return torch.full((batch, len(j)), 1.0 if variant == "avg" else 0.0, dtype=d.dtype, device=d.device)
    cz = torch.nn.functional.pad(torch.cumsum(d, dim=-1), (1, 0))  # cz[..., t] = sum of d[..., :t]
    if forward:  # steps j+1 .. q
        S = cz[:, :, q + 1 - lo] - cz[:, :, j + 1 - lo]
    else:  # steps q .. j-1 (the backward scan visits them after j)
        S = cz[:, :, j - lo] - cz[:, :, q - lo]
    A = st.A
    P = torch.exp(A[None, :, :, None] * S[:, :, None, :])  # (batch, E, N, R)
    if variant == "decay":
        return P.mean(dim=(1, 2))
    dj, dq = d[:, :, j - lo], d[:, :, q - lo]  # (batch, E, R)
    Bs = st.B_at(span).to(d.dtype)
    Bj, Bq = Bs[:, :, j - lo], Bs[:, :, q - lo]  # (batch, N, R)
    if variant in ("lsq", "lsq_norm"):
        # <P*Bbar_j, Bbar_q>_F / |Bbar_q|_F^2 with Bbar = delta (x) B: the denominator factorises.
        num = torch.einsum("benr,ber,bnr->br", P, dj * dq, Bj * Bq)
        den = (dq * dq).sum(dim=1) * (Bq * Bq).sum(dim=1)
        w = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
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


def token_weights(stats, plan, variant="lsq", clamp=1e-6):
    """One scalar weight per reduced token and image, (batch, R) in plan order (SPEC §4; eq. 11 with the
    statistics of the layer just run). ``stats``: {"forward": DirectionStats, "backward": DirectionStats}
    as ``MambaMixer.stats`` holds them. Twin of ``stm_ref.merge.token_weights`` applied with the Euler
    Abar/Bbar of each direction."""
    if variant not in TOKEN_WEIGHT_VARIANTS:
        raise ValueError(f"weights must be one of {TOKEN_WEIGHT_VARIANTS}, got {variant!r}")
    f, b = stats["forward"], stats["backward"]
    batch = f.delta_raw.shape[0]
    dtype = f.bias.dtype
    out = torch.empty(batch, len(plan.reduced), dtype=dtype, device=f.delta_raw.device)
    left = plan.left
    if bool(left.any()):
        out[:, left] = _side_weights(f, plan.reduced[left], plan.target[left], True, variant, clamp)
    right = ~left
    if bool(right.any()):
        out[:, right] = _side_weights(b, plan.reduced[right], plan.target[right], False, variant, clamp)
    return out


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
