"""STM's merge in PyTorch, batched (eq. 11; docs/conventions.md §3-4); reference twin: ``stm_ref.merge``.

A merge step happens between two layers. The plan (which tokens go where) is the same for every image
and comes from ``stm_ref.merge.merge_plan``, cached as index tensors. The weights depend on the image:
they are computed from the statistics the layer just run already produced (per-token delta after
softplus, B, and A of each direction), with Mamba's Euler discretisation Abar = exp(delta*A),
Bbar = delta*B (what its kernels compute). Left-side tokens use the forward direction, right-side
tokens the backward direction, all indexed by token position.

Each weight variant is one ``WeightVariant`` record of ``WEIGHT_VARIANTS`` with its one definition (a
per-pair formula, a constant, the tokens' sizes, or a joint fit) and the facts the rest of the package
reads (whether it reads the statistics or the scan's first steps, whether merges normalise). Faster forms
of a definition, a batched torch form on the record and the compiled weight kernels that name the variant
(``stm_fast.ops.weight_kernels``), are tried first where they apply (``fast_forms``; tests/test_merge.py
checks each against the definition). Adding a variant: its definition and record here, its twin in
``stm_ref.merge``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Callable

import numpy as np
import torch

from stm_ref.merge import JOINT_RIDGE, merge_plan, noise_row

from ..ops.common import LOG2E
from ..ops.weight_kernels import kernels_for, weight_kernel

__all__ = ["PlanIndex", "plan_index", "token_weights", "ends_weights", "merge_tokens", "merge_ends", "size_weights",
           "merged_sizes", "WeightVariant", "WEIGHT_VARIANTS", "weight_variant", "fast_forms", "TOKEN_WEIGHT_VARIANTS",
           "CONSTANT_VARIANTS", "NORMALISED_VARIANTS"]


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
    """(batch, R) weights all equal to ``value`` (a constant variant, or an empty side), in the statistics' dtype."""
    f = stats.forward
    return torch.full((f.delta_raw.shape[0], R), value, dtype=f.bias.dtype, device=f.delta_raw.device)


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


# --- The weight variants' definitions (docs/conventions.md §4; twins: stm_ref.merge.token_weights) -------------
# A per-pair definition gives, per reduced token j -> target q, the scalar weight from that direction's statistics:
# P (..., N, E): P_{j->q} = exp(A * the sum of delta over the steps after j up to and including q in scan order)
# (eq. 11); dj, dq (..., E): delta; Bj, Bq (..., N): B (leading axes broadcast); Bbar = delta (x) B. Channels are
# the last, contiguous axis throughout, so every op is a row-wise vector op and the sum over states is one small
# matrix product.

def _decay_products(A2, S):
    """P = exp(A * S) = exp2(A2 * S): (..., R, N, E) from S (..., R, E) and A2 = A * log2(e) as (N, E)."""
    return torch.mul(A2, S[..., None, :]).exp2_()


def _decay(P, dj, dq, Bj, Bq, clamp):
    """``decay``: the mean over (N, E) of P_{j->q} (eq. 11's decay alone; shapes above)."""
    return P.mean(dim=(-2, -1))


def _lsq(P, dj, dq, Bj, Bq, clamp):
    """``lsq`` (eq. 11): <P*Bbar_j, Bbar_q>_F / |Bbar_q|_F^2 with Bbar = delta (x) B (shapes above): the sum over
    N first, the denominator factorised as |delta_q|^2 |B_q|^2; 0 where Bbar_q = 0."""
    inner = torch.matmul((Bj * Bq)[..., None, :], P)[..., 0, :]  # (..., E)
    num = torch.linalg.vecdot(inner, dj * dq)
    den = torch.linalg.vecdot(dq, dq) * torch.linalg.vecdot(Bq, Bq)
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)  # den = 0 only if Bbar_q = 0, and then num = 0 too


def _lsq_norm(P, dj, dq, Bj, Bq, clamp):
    """``lsq_norm``: ``lsq`` clamped to [0, 1] (merged as a weighted average)."""
    return _lsq(P, dj, dq, Bj, Bq, clamp).clamp(0.0, 1.0)


def _mean(P, dj, dq, Bj, Bq, clamp):
    """``mean``: the mean over (N, E) of P*Bbar_j/Bbar_q, |Bbar_q| floored at ``clamp`` * max|Bbar_q| (sign kept,
    0 counts as positive); 0 where Bbar_q = 0 (shapes above)."""
    Bbar_j = dj[..., None, :] * Bj[..., :, None]  # (..., N, E)
    Bbar_q = dq[..., None, :] * Bq[..., :, None]
    floor = clamp * Bbar_q.abs().amax(dim=(-2, -1), keepdim=True)
    sign = torch.where(Bbar_q < 0, -1.0, 1.0).to(P.dtype)
    den = sign * torch.maximum(Bbar_q.abs(), floor)
    w = (P * Bbar_j / torch.where(floor > 0, den, torch.ones_like(den))).mean(dim=(-2, -1))
    return torch.where(floor[..., 0, 0] > 0, w, torch.zeros_like(w))


def _lsq_from_first_steps(P, d, Bh, r):
    """``lsq`` weights (r, sides, batch) from step-major P (r, sides, batch, N, E), delta (r + 1, sides, batch, E)
    and B (r + 1, sides, batch, N): the batched form of ``_lsq`` (eq. 11), as batched small matrix products on
    these fixed shapes. A deliberate twin (tests/test_merge.py compares every faster form with its definition):
    inside a forward the STM step is dominated by per-call overhead (each torch call costs a few microseconds
    on a CPU whatever its size), so this form makes as few calls as it can; folding both into one shape-generic
    function made the step measurably slower inside forwards."""
    _, s, b, N, E = P.shape
    G = r * s * b
    dq, Bq = d[r], Bh[r]
    inner = torch.bmm(torch.mul(Bh[:r], Bq).view(G, 1, N), P.reshape(G, N, E))  # sum over N of P*Bj*Bq
    num = torch.linalg.vecdot(inner.view(r, s, b, E), torch.mul(d[:r], dq))
    den = torch.linalg.vecdot(dq, dq).mul_(torch.linalg.vecdot(Bq, Bq))  # |Bbar_q|_F^2 = |delta_q|^2 |B_q|^2
    return num.div_(den.clamp_min_(torch.finfo(den.dtype).tiny))  # den = 0 only if Bbar_q = 0, and then num = 0 too


def _lsq_norm_from_first_steps(P, d, Bh, r):
    """The batched form of ``_lsq_norm`` (``_lsq_from_first_steps`` clamped to [0, 1])."""
    return _lsq_from_first_steps(P, d, Bh, r).clamp_(0.0, 1.0)


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


def size_weights(size, plan):
    """``size`` weights size_j / size_q (ToMe's size-weighted average once normalised), (batch, R) in plan
    order (left tokens first), from the tokens' sizes (batch, L) (twin: ``stm_ref.merge.token_weights``)."""
    if plan.ends is not None:
        rl, rr = plan.ends
        L = size.shape[1]
        return torch.cat([size[:, :rl] / size[:, rl:rl + 1], size[:, L - rr:] / size[:, L - rr - 1:L - rr]], dim=1)
    return size.index_select(1, plan.reduced) / size.index_select(1, plan.target)


# --- The table: one record per variant, each with its one definition ---------------------------------------------

@dataclass(frozen=True, kw_only=True)
class WeightVariant:
    """One weight variant of STM's merge (docs/conventions.md §4) and its one definition, exactly one of:

    * ``pair``: f(P, dj, dq, Bj, Bq, clamp), each reduced token's weight from its direction's statistics
      (eq. 11; the shapes above ``_decay``);
    * ``constant``: every weight is this value (no statistics read);
    * ``sizes``: f(size, plan) -> (batch, R), from the tokens' sizes;
    * ``joint``: f(directions, r) -> (sides, batch, r), each side's r weights fitted together (the ``ends``
      plan only; it also reads the scan input u).

    ``normalised``: merges divide by 1 + the sum of the weights. ``batched``: an optional faster form of
    ``pair`` on the scan's first steps, f(P, d, B, r) -> (r, sides, batch) (``_lsq_from_first_steps``'s
    shapes); the compiled forms are the weight kernels that name the variant (``stm_fast.ops.weight_kernels``).
    ``fast_forms`` lists both; tests/test_merge.py checks each against the definition.
    """

    name: str
    pair: Callable | None = None
    constant: float | None = None
    sizes: Callable | None = None
    joint: Callable | None = None
    normalised: bool = False
    batched: Callable | None = None

    def __post_init__(self):
        defined = [f for f in ("pair", "constant", "sizes", "joint") if getattr(self, f) is not None]
        if len(defined) != 1:
            raise ValueError(f"weight variant {self.name!r}: give exactly one definition, got {defined or 'none'}")
        if self.batched is not None and self.pair is None:
            raise ValueError(f"weight variant {self.name!r}: a batched form needs a pair definition to twin")

    @property
    def reads_statistics(self) -> bool:
        """Whether the weights read the layer's statistics (what the step's overhead counts)."""
        return self.pair is not None or self.joint is not None

    @property
    def reads_first_steps(self) -> bool:
        """Whether the ``ends`` plan's weights can use the scan's exported first steps (``STM.stats_request``)."""
        return self.pair is not None

    @property
    def ends_only(self) -> bool:
        """Whether the weights exist for the ``ends`` plan only."""
        return self.joint is not None

    @property
    def extra_inputs(self) -> tuple[str, ...]:
        """What the weights need besides the layer's delta, A and B: the tokens' sizes, the scan input u."""
        return ("sizes",) if self.sizes is not None else ("u",) if self.joint is not None else ()


WEIGHT_VARIANTS = MappingProxyType({v.name: v for v in (  # the order of stm_ref.merge.TOKEN_WEIGHT_VARIANTS
    WeightVariant(name="lsq", pair=_lsq, batched=_lsq_from_first_steps),
    WeightVariant(name="mean", pair=_mean),
    WeightVariant(name="decay", pair=_decay),
    WeightVariant(name="lsq_norm", pair=_lsq_norm, batched=_lsq_norm_from_first_steps, normalised=True),
    WeightVariant(name="avg", constant=1.0, normalised=True),
    WeightVariant(name="drop", constant=0.0),
    WeightVariant(name="size", sizes=size_weights, normalised=True),
    WeightVariant(name="lsq_joint", joint=_joint_ends_weights),
    WeightVariant(name="noise", constant=1.0, normalised=True),  # then replaced by noise: merge_tokens
)})
TOKEN_WEIGHT_VARIANTS = tuple(WEIGHT_VARIANTS)
NORMALISED_VARIANTS = tuple(n for n, v in WEIGHT_VARIANTS.items() if v.normalised)  # merged as a weighted average
CONSTANT_VARIANTS = tuple(n for n, v in WEIGHT_VARIANTS.items() if not v.reads_statistics)  # read no statistics


def weight_variant(name) -> WeightVariant:
    """The record of weight variant ``name``; ValueError naming the choices for an unknown one."""
    if name not in WEIGHT_VARIANTS:
        raise ValueError(f"weights must be one of {TOKEN_WEIGHT_VARIANTS}, got {name!r}")
    return WEIGHT_VARIANTS[name]


def fast_forms(variant) -> dict:
    """The faster forms registered for ``variant``'s ``ends`` weights from the scan's first steps, by name:
    ``batched`` (the record's) and ``kernel <name>`` per compiled weight kernel naming it (nothing probed
    here). Each is f(d, abar, B, r) -> (S, batch, r) in scan order on step-major first steps of S directions,
    d (n, S, batch, E), abar (n, S, batch, N, E), B (n, S, batch, N), n > r, or None where it does not run on
    these tensors; it may overwrite abar. ``ends_weights`` tries a kernel, then the batched form, then the
    definition; tests/test_merge.py checks every form against the definition."""
    spec = weight_variant(variant)
    forms = {}
    if spec.batched is not None:
        forms["batched"] = lambda d, a, B, r: spec.batched(_suffix_products(a, r), d, B, r).permute(1, 2, 0)
    for k in kernels_for(variant):
        forms[f"kernel {k.name}"] = lambda d, a, B, r, k=k: (
            k.load()(d, a, B, r, variant) if d.dtype in k.dtypes and k.works(d.device) else None)
    return forms


# --- Choosing a form: the definitions above are the fallback ------------------------------------------------------

def _side_weights(st, side, spec, clamp):
    """Scalar weights (batch, R_side) for one side's reduced tokens, from that direction's statistics.

    ``st``: a ``DirectionStats``; ``side``: its ``SideIndex``; ``spec``: a ``WeightVariant``. Only the
    positions between the reduced tokens and their targets are read.
    """
    d = st.delta_rows(side.span)  # (batch, span, E)
    if spec.constant is not None:
        return torch.full((d.shape[0], len(side.j)), spec.constant, dtype=d.dtype, device=d.device)
    if spec.pair is None:
        raise ValueError(f"weights={spec.name!r} have no per-token form: "
                         + ("they come from the tokens' sizes (size_weights)" if spec.sizes else "the ends plan only"))
    cz = torch.nn.functional.pad(torch.cumsum(d, dim=1), (0, 0, 1, 0))
    S = cz.index_select(1, side.upper) - cz.index_select(1, side.lower)  # (batch, R, E)
    Bs = st.B_rows(side.span).to(d.dtype)  # (batch, span, N)
    P = _decay_products(st.A.t() * LOG2E, S)
    return spec.pair(P, d.index_select(1, side.j), d.index_select(1, side.q),
                     Bs.index_select(1, side.j), Bs.index_select(1, side.q), clamp)


def _suffix_products(a, r):
    """P_j = Abar_{j+1} ... Abar_r (eq. 11) as rows 1..r of step-major Abar a (n, ...), n > r, computed in place
    (the caller owns a); r is a few tokens (cumprod is slower)."""
    rows = a.unbind(0)
    for j in range(r - 1, 0, -1):
        torch.mul(rows[j], rows[j + 1], out=rows[j])
    return a[1:r + 1]


def _stacked_pair(pair):
    """Both directions' first steps (forward, backward ``FirstSteps``) stacked step-major into new tensors:
    delta (n, 2, batch, E), Abar (n, 2, batch, N, E), B (n, 2, batch, N) or None."""
    f, b = pair
    B = None if f.B is None or b.B is None else torch.stack([f.B, b.B], 1)
    return torch.stack([f.delta, b.delta], 1), torch.stack([f.Abar, b.Abar], 1), B


def _from_first_steps(spec, sts, first, r, clamp):
    """Weights (len(sts), batch, r) in each direction's scan order from the scan's first steps ``first``: delta
    (n, sides, batch, E), Abar (n, sides, batch, N, E) and B (n, sides, batch, N) or None, step-major, n > r
    (reused: no exp). The caller owns them: the Abar buffer is overwritten with P. The variant's batched form
    where it has one, else its definition."""
    d, a, Bh = first
    P = _suffix_products(a, r)
    if Bh is None:
        Bh = torch.stack([st.first_B(r + 1) for st in sts], dim=1)
    if Bh.dtype != d.dtype:
        Bh = Bh.to(d.dtype)
    if spec.batched is not None:
        w = spec.batched(P, d, Bh, r)
    else:
        w = spec.pair(P, d[:r], d[r:r + 1], Bh[:r], Bh[r:r + 1], clamp)  # (r, sides, batch)
    return w.permute(1, 2, 0).contiguous()  # contiguous rows: bmm on strided operands loops per image


def _recomputed(spec, sts, r, clamp):
    """Weights (len(sts), batch, r) of the ``ends`` plan from the statistics alone (softplus and exp(A * the sum
    of delta)): there a side's reduced tokens are its direction's first r scan steps and their common target is
    step r, so only the first r + 1 rows are read (slices, no gathers), the directions stacked."""
    if spec.joint is not None:
        return spec.joint(sts, r)
    d, B, P = _ends_decays(sts, r)
    return spec.pair(P, d[:, :, :r], d[:, :, r:], B[:, :, :r], B[:, :, r:], clamp)


def _both_sides(spec, stats, r, pair, clamp):
    """(forward, backward) weights (batch, r) in scan order when both sides merge r tokens, from the first steps
    ``pair`` (owned by the caller) or, when None, from the statistics: a compiled weight kernel on each
    direction's buffers as they are (no stacking copy) where one computes the variant and takes them, else
    both directions stacked, one set of small kernels for the whole step."""
    if pair is not None:
        kernel = weight_kernel(spec.name, [t for f in pair for t in (f.delta, f.Abar, f.B)])
        if kernel is not None:
            return tuple(kernel(f.delta[:, None], f.Abar[:, None], f.B[:, None].to(f.delta.dtype), r, spec.name)[0]
                         for f in pair)
    sts = [stats.forward, stats.backward]
    if pair is None:
        w = _recomputed(spec, sts, r, clamp)
    else:
        w = _from_first_steps(spec, sts, _stacked_pair(pair), r, clamp)
    return w[0], w[1]


def _side_alone(spec, stats, forward, r, first, clamp):
    """Weights (batch, r) of one side weighed alone (sides of unequal r) by the direction that carries it
    (``forward``: the left side), in its scan order; from ``first``, that direction's own first steps
    (``FirstSteps``, owned by the caller) as a one-direction stack of views, or recomputed when None. (A side
    alone takes the torch forms: the compiled kernels serve equal sides, the default ``sides='both'``.)"""
    direction = [stats.direction(forward)]
    if first is None:
        return _recomputed(spec, direction, r, clamp)[0]
    stack = (first.delta[:, None], first.Abar[:, None], None if first.B is None else first.B[:, None])
    return _from_first_steps(spec, direction, stack, r, clamp)[0]


def ends_weights(stats, r_left, r_right, variant="lsq", clamp=1e-6):
    """Weights of the ``ends`` plan as (left (batch, r_left), right (batch, r_right)), each in token position
    order; what ``token_weights`` returns for that plan, split by side (eq. 11, docs/conventions.md §4). A
    variant that reads the scan's first steps takes them from ``stats`` (``LayerStats.take_first_steps``): this
    call owns them and overwrites their Abar buffers, so a second call on the same statistics raises."""
    spec = weight_variant(variant)
    if spec.constant is not None:
        return _filled(stats, r_left, spec.constant), _filled(stats, r_right, spec.constant)
    if spec.sizes is not None:
        raise ValueError(f"weights={variant!r} come from the tokens' sizes (size_weights), not the layer statistics")
    pair = stats.take_first_steps() if spec.reads_first_steps else None
    if pair is not None and pair[0].delta.shape[0] <= max(r_left, r_right):
        pair = None  # fewer steps than the plan reads: recomputed from the statistics
    if r_left == r_right and r_left > 0:
        left, right = _both_sides(spec, stats, r_left, pair, clamp)
    else:
        first_f, first_b = (None, None) if pair is None else pair
        left = _side_alone(spec, stats, True, r_left, first_f, clamp) if r_left else _filled(stats, 0, 0.0)
        right = _side_alone(spec, stats, False, r_right, first_b, clamp) if r_right else _filled(stats, 0, 0.0)
    return left, right.flip(-1)  # right-side tokens in position order are the backward scan's steps reversed


def token_weights(stats, plan, variant="lsq", clamp=1e-6):
    """One scalar weight per reduced token and image, (batch, R) in plan order (docs/conventions.md §4; eq. 11
    with the statistics of the layer just run). ``stats``: the layer's ``LayerStats``. Twin of
    ``stm_ref.merge.token_weights`` applied with the Euler Abar/Bbar of each direction. For the ``ends`` plan,
    ``ends_weights``: it takes the statistics' first steps."""
    spec = weight_variant(variant)
    if plan.ends is not None:
        return torch.cat(ends_weights(stats, *plan.ends, variant, clamp), dim=1)  # left tokens precede right ones
    if not plan.sides:
        return _filled(stats, 0, 0.0)
    parts = [_side_weights(stats.direction(sd.forward), sd, spec, clamp) for sd in plan.sides]
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


def merged_sizes(size, plan, variant):
    """The sizes (batch, K) after the plan: each kept token's plus those merged into it (kept as is for ``drop``)."""
    out = plan.take(size).clone()
    if variant != "drop" and len(plan.reduced):
        out.index_add_(1, plan.target_k, size.index_select(1, plan.reduced))
    return out
