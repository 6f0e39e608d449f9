"""STM's merge in float64 NumPy: BNNM plans (sec. 4.1), HSP weights (eq. 11, 20, 21), losses (eq. 8-13).

Conventions (docs/conventions.md §2-4). Every array is indexed by *token position*, whatever the direction:
``Abar, Bbar`` (L, D, N) and ``u`` (L, D) of the backward direction are the backward branch's
quantities at each original position. The forward direction scans t = 0 -> L-1, the backward one
t = L-1 -> 0; "after j in scan order" therefore means j+1.. forward and j-1.. backward.
Left-side reductions (positions < cls) are handled by the forward direction, right-side ones by
the backward direction: only that direction carries their information to the class token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .ssm import decay_product, scan

__all__ = [
    "MergePlan",
    "merge_plan",
    "scan_direction",
    "fading_factor",
    "merge_weights",
    "exact_merge",
    "merged_states",
    "token_weights",
    "merge_tokens",
    "removal_loss",
    "final_loss",
    "merging_loss",
    "TOKEN_WEIGHT_VARIANTS",
    "NORMALISED_VARIANTS",
    "CONSTANT_VARIANTS",
    "joint_weights",
    "noise_row",
]

DIRECTIONS = ("forward", "backward")
TOKEN_WEIGHT_VARIANTS = ("lsq", "mean", "decay", "lsq_norm", "avg", "drop", "size", "lsq_joint", "noise")
NORMALISED_VARIANTS = ("lsq_norm", "avg", "size", "noise")  # merged as a weighted average, not eq. 11's sum
CONSTANT_VARIANTS = ("avg", "drop", "size", "noise")  # weights that read no layer statistics
JOINT_RIDGE = 1e-9  # lsq_joint: ridge on its normal equations, relative to their mean diagonal


@dataclass(frozen=True)
class MergePlan:
    """Which tokens of a length-L sequence are kept, and where each reduced token goes.

    ``kept``: ascending positions that survive (the class token among them).
    ``reduced``: ascending positions that are reduced; ``target[i]`` is the kept position that
    ``reduced[i]`` merges into (the nearest kept token on its side, toward the class token).
    ``new_cls``: the class token's index in the merged sequence.
    """

    L: int
    cls: int
    kept: np.ndarray
    reduced: np.ndarray
    target: np.ndarray
    new_cls: int = field(default=0)

    def side_of(self, j):
        return "left" if j < self.cls else "right"

    def reduced_on(self, side):
        """(reduced positions, their targets) on one side ('left' or 'right')."""
        mask = self.reduced < self.cls if side == "left" else self.reduced > self.cls
        return self.reduced[mask], self.target[mask]

    def groups(self, side):
        """{target: [reduced positions merging into it]} for one side, targets ascending."""
        out = {}
        for j, q in zip(*self.reduced_on(side)):
            out.setdefault(int(q), []).append(int(j))
        return dict(sorted(out.items()))


def _side_reduced(n, r, positions):
    """Distances from the class token (1 = adjacent) of the r reduced tokens of a side of n tokens."""
    if positions == "ends":
        return [n - i for i in range(r)]
    if positions == "uniform":
        # r evenly spaced distances among n .. 2 (cell centres of r equal cells); the token adjacent
        # to the class token is never reduced, so every reduced token has a kept target on its side.
        return [n - ((2 * i + 1) * (n - 1)) // (2 * r) for i in range(r)]
    raise ValueError(f"positions must be 'ends' or 'uniform', got {positions!r}")


def merge_plan(L, cls, r_left, r_right, positions="ends"):
    """BNNM plan (sec. 4.1, docs/conventions.md §3): reduce r_left tokens left of ``cls`` and r_right right of it.

    Each reduced token merges into the nearest kept token on its side in the direction of the class
    token. At least one token per side must stay to receive the merges, so the largest feasible r on
    a side of n tokens is n - 1 (0 for an empty side). Raises ValueError naming that bound.
    """
    L, cls = int(L), int(cls)
    if L < 1:
        raise ValueError(f"merge_plan: sequence length must be >= 1, got L={L}")
    if not 0 <= cls < L:
        raise ValueError(f"merge_plan: class token position {cls} is outside the sequence 0..{L - 1}")
    sides = {"left": (cls, r_left), "right": (L - 1 - cls, r_right)}
    reduced, target = [], []
    for side, (n, r) in sides.items():
        if int(r) != r or r < 0:
            raise ValueError(f"merge_plan: r_{side} must be a non-negative integer, got {r!r}")
        r = int(r)
        rmax = max(n - 1, 0)
        if r > rmax:
            raise ValueError(
                f"merge_plan: cannot reduce {r} tokens on the {side} side: it has {n} tokens and one must "
                f"remain to receive the merges (the class token is never reduced); the largest feasible "
                f"r_{side} is {rmax}")
        dists = _side_reduced(n, r, positions)
        sign = -1 if side == "left" else 1
        gone = {cls + sign * d for d in dists}
        for d in sorted(dists):
            pos = cls + sign * d
            # nearest kept position toward the class token
            k = d - 1
            while cls + sign * k in gone:
                k -= 1
            reduced.append(pos)
            target.append(cls + sign * k)
    order = np.argsort(reduced)
    reduced = np.asarray(reduced, dtype=np.int64)[order]
    target = np.asarray(target, dtype=np.int64)[order]
    kept = np.setdiff1d(np.arange(L), reduced)
    new_cls = int(np.searchsorted(kept, cls))
    return MergePlan(L=L, cls=cls, kept=kept, reduced=reduced, target=target, new_cls=new_cls)


def _check_direction(direction):
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")


def _side(direction):
    return "left" if direction == "forward" else "right"


def scan_direction(Abar, Bbar, u, direction="forward"):
    """Hidden states of one direction, position-indexed (the backward scan runs t = L-1 -> 0)."""
    _check_direction(direction)
    if direction == "forward":
        return scan(Abar, Bbar, u)
    return scan(Abar[::-1], Bbar[::-1], np.asarray(u)[::-1])[::-1]


def fading_factor(Abar, p, t):
    """prod of Abar strictly after p up to and including t in scan order (eq. 12-13, 24).

    t > p: the forward scan's factor; t < p: the backward scan's. The loss at p reaches t scaled by it.
    """
    return decay_product(Abar, p, t)


def merge_weights(Abar, Bbar, plan, direction="forward"):
    """Exact hidden-space weights W_j = P_{j->q} * Bbar_j / Bbar_q for this direction's reduced tokens (eq. 20/21).

    Returns {j: (D, N) array} for the side that ``direction`` carries to the class token.
    Needs Bbar_q != 0 at every target (else no finite weight can reproduce h; ValueError).
    """
    _check_direction(direction)
    Abar = np.asarray(Abar, dtype=np.float64)
    Bbar = np.asarray(Bbar, dtype=np.float64)
    out = {}
    for j, q in zip(*plan.reduced_on(_side(direction))):
        j, q = int(j), int(q)
        if np.any(Bbar[q] == 0):
            raise ValueError(f"merge_weights: Bbar at target {q} has exact zeros; the exact weight is undefined")
        out[j] = fading_factor(Abar, j, q) * Bbar[j] / Bbar[q]
    return out


def _gap_products(Abar, plan, direction):
    """Abar* for each kept position: the product of Abar over the gap back to the previous kept one."""
    kept = [int(k) for k in plan.kept]
    order = kept if direction == "forward" else kept[::-1]
    Astar = {}
    prev = -1 if direction == "forward" else plan.L
    for k in order:
        if direction == "forward":
            Astar[k] = np.prod(Abar[prev + 1 : k + 1], axis=0)
        else:
            Astar[k] = np.prod(Abar[k:prev], axis=0)
        prev = k
    return np.stack([Astar[k] for k in kept])


def merged_states(Abar, Bbar, u, plan, direction="forward", weights=None):
    """h* at the kept positions when the merged sequence is scanned in ``direction`` (position-indexed, (K, D, N)).

    Step k of the merged sequence uses Abar* = the product of Abar over the gap it spans (so the
    decay of removed positions stays, docs/conventions.md §11, claim 2), Bbar_q, and the input u*_q = u_q + sum_j w_j u_j
    over this direction's reduced tokens merging into q. ``weights``: {j: scalar or (D, N) array};
    missing or None means 0 (the token is simply removed). Tokens reduced on the other side are
    removed in this direction (their input dropped, their decay kept).
    """
    _check_direction(direction)
    Abar = np.asarray(Abar, dtype=np.float64)
    Bbar = np.asarray(Bbar, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    weights = weights or {}
    L, D, N = Abar.shape
    kept = [int(k) for k in plan.kept]
    ustar = {k: np.broadcast_to(u[k][:, None], (D, N)).copy() for k in kept}
    for j, q in zip(*plan.reduced_on(_side(direction))):
        w = weights.get(int(j))
        if w is not None:
            ustar[int(q)] = ustar[int(q)] + np.asarray(w, dtype=np.float64) * u[int(j)][:, None]
    Astar = _gap_products(Abar, plan, direction)
    Bstar = Bbar[kept]
    U = np.stack([ustar[k] for k in kept])
    return scan_direction(Astar, Bstar, U, direction)


def exact_merge(Abar, Bbar, u, plan, direction="forward"):
    """The merged-step sequence (Abar*, Bbar*, u*) of docs/conventions.md §4, one step per kept position (position order).

    Abar*_k is the product of Abar over the gap that step k spans, Bbar*_k = Bbar_{q_k}, and the
    hidden-space input u*_k = u_{q_k} + sum_j W_j u_j (eq. 20) with the exact weights of this
    direction's reduced tokens. Scanning it in ``direction`` (``scan_direction``) reproduces h at
    every kept position on the merging side and at the class token (eq. 18).
    Shapes: (K, D, N), (K, D, N), (K, D, N).
    """
    Abar = np.asarray(Abar, dtype=np.float64)
    Bbar = np.asarray(Bbar, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    W = merge_weights(Abar, Bbar, plan, direction)
    D, N = Abar.shape[1:]
    kept = [int(k) for k in plan.kept]
    ustar = {k: np.broadcast_to(u[k][:, None], (D, N)).copy() for k in kept}
    for j, q in zip(*plan.reduced_on(_side(direction))):
        ustar[int(q)] += W[int(j)] * u[int(j)][:, None]
    return _gap_products(Abar, plan, direction), Bbar[kept], np.stack([ustar[k] for k in kept])


def token_weights(Abar, Bbar, plan, direction="forward", variant="lsq", Bbar_est=None, clamp=1e-6, u=None, size=None):
    """One scalar weight per reduced token of this direction's side (docs/conventions.md §4; eq. 11 with estimates).

    P_{j->q} always comes from the true ``Abar``; Bbar_j and Bbar_q from ``Bbar_est`` when given
    (the previous layer's Bbar, as eq. 11 uses), else from ``Bbar``. Variants:

    * ``lsq``: <P*Bbar_j, Bbar_q>_F / <Bbar_q, Bbar_q>_F, the least-squares scalar w with w*Bbar_q ~ P*Bbar_j.
    * ``mean``: mean over (d, s) of P*Bbar_j/Bbar_q, with |Bbar_q| clamped to at least
      ``clamp * max|Bbar_q|`` (sign kept; exact zeros count as positive).
    * ``decay``: mean over (d, s) of P_{j->q}.
    * ``lsq_norm``: ``lsq`` clamped to [0, 1] (``merge_tokens`` then normalises).
    * ``avg``: 1 for every token (``merge_tokens`` then averages). ``drop``: 0 for every token.
    * ``noise``: 1 for every token, as ``avg``; the merged token is then replaced by noise of its own scale
      (``noise_row``): the positive control of HSP's claims, which destroys what the merge carries.
    * ``size``: size_j / size_q, ToMe's size-weighted average (``merge_tokens`` normalises); ``size`` (L,)
      holds how many original tokens each token stands for.
    * ``lsq_joint``: the weights of one target's group fitted together to the hidden-state error at the
      merge point, ``joint_weights``; needs the SSM input ``u`` (L, D) of this direction.

    Returns {j: float}.
    """
    _check_direction(direction)
    if variant not in TOKEN_WEIGHT_VARIANTS:
        raise ValueError(f"token_weights: variant must be one of {TOKEN_WEIGHT_VARIANTS}, got {variant!r}")
    Abar = np.asarray(Abar, dtype=np.float64)
    Bb = np.asarray(Bbar if Bbar_est is None else Bbar_est, dtype=np.float64)
    if variant == "lsq_joint":
        return joint_weights(Abar, Bb, u, plan, direction)
    out = {}
    for j, q in zip(*plan.reduced_on(_side(direction))):
        j, q = int(j), int(q)
        out[j] = _scalar_weight(variant, fading_factor(Abar, j, q), Bb[j], Bb[q], clamp,
                                None if size is None else (size[j], size[q]))
    return out


def _scalar_weight(variant, P, Bj, Bq, clamp, sizes):
    """The weight of one reduced token j merging into q (see ``token_weights``)."""
    if variant == "lsq" or variant == "lsq_norm":
        den = np.sum(Bq * Bq)
        w = float(np.sum(P * Bj * Bq) / den) if den > 0 else 0.0
        return min(max(w, 0.0), 1.0) if variant == "lsq_norm" else w
    if variant == "mean":
        floor = clamp * np.max(np.abs(Bq))
        if floor == 0:
            return 0.0
        sign = np.where(Bq < 0, -1.0, 1.0)
        return float(np.mean(P * Bj / (sign * np.maximum(np.abs(Bq), floor))))
    if variant == "decay":
        return float(np.mean(P))
    if variant == "size":
        if sizes is None:
            raise ValueError("token_weights: the size variant needs the tokens' sizes (size=...)")
        return float(sizes[0]) / float(sizes[1])
    return 1.0 if variant in ("avg", "noise") else 0.0  # drop


def noise_row(L: int, q: int, C: int) -> np.ndarray:
    """The positive control's noise for the token at index q of a length-L sequence: C standard normal
    values seeded by (L, q), scaled to a root mean square of 1 (the fast path draws the same values)."""
    v = np.random.default_rng([L, q]).standard_normal(C)
    return v / np.sqrt(np.mean(v * v))


def joint_weights(Abar, Bbar, u, plan, direction="forward"):
    """``lsq_joint``: per target q, the weights w of its reduced tokens J minimising, over (d, s),
    |sum_{j in J} (w_j Bbar_q - P_{j->q} Bbar_j) u_j|^2, the loss at the merge point when the merged
    token's input is u_q + sum_j w_j u_j (eq. 19 with one scalar per token; docs/conventions.md §4).
    Normal equations G w = b with G_jk = <Bbar_q u_j, Bbar_q u_k>_F, b_j = <Bbar_q u_j, sum_k P_k Bbar_k u_k>_F,
    solved with a ridge of ``JOINT_RIDGE`` times G's mean diagonal (G is singular when two u_j are parallel)."""
    if u is None:
        raise ValueError("token_weights: the lsq_joint variant needs the SSM input u (L, D) of the direction")
    u = np.asarray(u, dtype=np.float64)
    out = {}
    for q, js in plan.groups(_side(direction)).items():
        M = [Bbar[q] * u[j][:, None] for j in js]  # (D, N) each: w_j's column of the design
        target = sum(fading_factor(Abar, j, q) * Bbar[j] * u[j][:, None] for j in js)
        G = np.array([[np.sum(mj * mk) for mk in M] for mj in M])
        b = np.array([np.sum(mj * target) for mj in M])
        ridge = JOINT_RIDGE * max(float(np.trace(G)) / len(js), np.finfo(np.float64).tiny)
        w = np.linalg.solve(G + ridge * np.eye(len(js)), b)
        out.update({j: float(wj) for j, wj in zip(js, w)})
    return out


def merge_tokens(x, plan, weights, variant="lsq"):
    """Apply a plan to tokens x (L, C) with scalar weights {j: w}; returns the merged (K, C) sequence.

    ``lsq``, ``mean``, ``decay``: x*_q = x_q + sum_j w_j x_j (eq. 11's sum).
    ``lsq_norm``, ``avg``, ``size``: x*_q = (x_q + sum_j w_j x_j) / (1 + sum_j w_j).
    ``drop``: x*_q = x_q (reduced tokens vanish). ``noise``: as ``avg``, then every x*_q that received a
    merge replaced by ``noise_row`` scaled to its root mean square. Every reduced token needs a weight.
    """
    if variant not in TOKEN_WEIGHT_VARIANTS:
        raise ValueError(f"merge_tokens: variant must be one of {TOKEN_WEIGHT_VARIANTS}, got {variant!r}")
    x = np.asarray(x, dtype=np.float64)
    acc = {int(k): x[int(k)].copy() for k in plan.kept}
    mass = {int(k): 1.0 for k in plan.kept}
    if variant != "drop":
        for j, q in zip(plan.reduced, plan.target):
            w = float(weights[int(j)])
            acc[int(q)] += w * x[int(j)]
            mass[int(q)] += w
    normalise = variant in NORMALISED_VARIANTS
    out = np.stack([acc[int(k)] / mass[int(k)] if normalise else acc[int(k)] for k in plan.kept])
    if variant == "noise":  # every token that received a merge becomes noise of its own root mean square
        kept = [int(k) for k in plan.kept]
        for q in sorted({int(q) for q in plan.target}):
            i = kept.index(q)
            out[i] = noise_row(x.shape[0], q, x.shape[1]) * np.sqrt(np.mean(out[i] * out[i]))
    return out


def removal_loss(Abar, Bbar, u, j, direction="forward"):
    """L_j = h_j - h*_j when only token j's input is removed (its decay stays): eq. 8, shape (D, N)."""
    u = np.asarray(u, dtype=np.float64)
    u_removed = u.copy()
    u_removed[j] = 0.0
    h = scan_direction(Abar, Bbar, u, direction)
    h_star = scan_direction(Abar, Bbar, u_removed, direction)
    return h[j] - h_star[j]


def final_loss(Abar, Bbar, u, plan, direction="forward", weights=None):
    """h - h* at every kept position for one direction (K, D, N); eq. 9 sums this over the directions."""
    h = scan_direction(Abar, Bbar, u, direction)
    return h[plan.kept] - merged_states(Abar, Bbar, u, plan, direction, weights)


def merging_loss(Abar, Bbar, u, plan, direction="forward", weights=None):
    """L_qM = L_q - sum_j P_{j->q} L_j at each kept q (eq. 10, one direction; (K, D, N)).

    The final loss at q minus the removal losses (eq. 8) of the reduced tokens, propagated to q by
    the SSM. With one gap this is eq. 10 as written; with several gaps every reduced token that the
    scan visits before q is subtracted, so that final loss = propagated removals + merging loss holds
    at every kept position, and ``drop`` (no merge) has zero merging loss. The sum over directions is
    the caller's, as for eq. 9.
    """
    _check_direction(direction)
    Abar = np.asarray(Abar, dtype=np.float64)
    out = final_loss(Abar, Bbar, u, plan, direction, weights)
    for i, q in enumerate(int(k) for k in plan.kept):
        for j in (int(r) for r in plan.reduced):
            before = j < q if direction == "forward" else j > q
            if before:
                out[i] -= fading_factor(Abar, j, q) * removal_loss(Abar, Bbar, u, j, direction)
    return out
