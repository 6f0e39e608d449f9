"""Rates, schedules and their feasibility: the one place a rate or a schedule is checked.

docs/conventions.md §6: N_l tokens enter layer l (N_0 = L), rate = 1 - sum_l N_l / (depth * N_0). A
schedule is the number of tokens removed after each layer, in total (for STM on both sides: split
equally between the sides, so its entries are even; the paper's "2 tokens per direction at every layer"
is schedule 4). A requested rate is met within ±1 percentage point by a schedule as uniform as possible
over the layers the method reduces at, front-loaded only when the token budget forces it.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

__all__ = ["check_rate", "is_integer", "rate_of", "tokens_per_layer", "solve_schedule", "check_schedule", "check_step_limits"]

TOLERANCE = 0.01  # a requested rate is met within ±1 percentage point


def check_rate(rate: float, what: str = "rate") -> float:
    """``rate`` as a float in [0, 1), else ValueError naming ``what`` (e.g. '--rates') and the fraction rule."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not math.isfinite(rate) or not 0 <= rate < 1:
        raise ValueError(f"{what} must be in [0, 1) (a fraction: 0.2 means 20%), got {rate!r}")
    return float(rate)


def is_integer(value) -> bool:
    """An int (or numpy integer), not a bool or a float: what counts as a number of tokens or a layer index."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _entries(schedule, depth, layers, method):
    """A schedule argument as a list of ints: an integer for every allowed layer, or a sequence of integers."""
    if is_integer(schedule):
        return [int(schedule) if i in layers else 0 for i in range(depth - 1)]
    if isinstance(schedule, (str, bytes)) or not hasattr(schedule, "__iter__"):
        raise ValueError(f"{method}: schedule must be an integer or a sequence of integers (tokens removed after each "
                         f"layer), got {schedule!r}")
    entries = list(schedule)
    for i, k in enumerate(entries):
        if not is_integer(k):
            raise ValueError(f"{method}: schedule entries must be integers (tokens), got {k!r} "
                             f"({type(k).__name__}) after layer {i}")
    return [int(k) for k in entries]


def rate_of(tokens_per_layer: Sequence[int]) -> float:
    """docs/conventions.md §6: 1 - sum_l N_l / (depth * N_0)."""
    return 1.0 - sum(tokens_per_layer) / (len(tokens_per_layer) * tokens_per_layer[0])


def tokens_per_layer(L: int, schedule: Sequence[int], depth: int) -> list[int]:
    """N_l for l = 0..depth-1: L, then minus the tokens removed after each layer."""
    n, out = L, []
    for i in range(depth):
        out.append(n)
        n -= schedule[i] if i < len(schedule) else 0
    return out


def solve_schedule(depth: int, L: int, rate: float, layers: Sequence[int], step_unit: int = 1,
                   max_total: int | None = None, step_limit: Callable[[int], int] | None = None) -> list[int]:
    """Tokens removed after each layer (a list of depth - 1) meeting ``rate`` within ±1 point.

    k_i = step_unit * m_i with m_i in {m, m+1} over the reduction points, the extra units spread evenly;
    the (m, extras) pair closest to the rate wins. When the token budget ``max_total`` makes that
    impossible over all points (e.g. one side only at high rates), the reductions move to the earliest
    points (a removal after layer i is felt by depth-1-i layers): the longest prefix of the points that
    reaches the rate is used. Raises ValueError with the feasible range.
    """
    layers = sorted(layers)
    if rate == 0:
        return [0] * (depth - 1)
    if not layers:
        raise ValueError("no layer to reduce at: the chosen layers/start_layer leave none")
    closest = None
    for n in range(len(layers), 0, -1):
        best = _uniform_schedule(depth, L, rate, layers[:n], step_unit, max_total, step_limit)
        if best is not None and (closest is None or best[0] < closest[0]):
            closest = best
        if best is not None and best[0] <= TOLERANCE:
            return best[1]
    hi = _max_rate(depth, L, layers, step_unit, max_total, step_limit)
    got = f"; the closest schedule gives {100 * closest[2]:.1f}%" if closest else ""
    raise ValueError(
        f"cannot reach a token reduction rate of {100 * rate:.1f}% within ±1 point{got}. With these options "
        f"the feasible rates run from 0 to {100 * hi:.1f}% (layers reduced at: {layers[0]}..{layers[-1]}, "
        f"{step_unit} token(s) per step unit); pass schedule=[...] for full control")


def _uniform_schedule(depth, L, rate, layers, step_unit, max_total, step_limit=None):
    """(|achieved - rate|, schedule, achieved) of the best near-uniform schedule over ``layers``, or None."""
    target = rate * depth * L  # token-layers to remove
    W = sum(depth - 1 - l for l in layers)
    best = None
    base = int(target // (step_unit * W))
    for m in (base - 1, base, base + 1):
        if m < 0:
            continue
        for extra in range(len(layers) + 1):
            chosen = {layers[int((e + 0.5) * len(layers) / extra)] for e in range(extra)} if extra else set()
            sched = [0] * (depth - 1)
            for l in layers:
                sched[l] = step_unit * (m + (l in chosen))
            if max_total is not None and sum(sched) > max_total:
                continue
            tokens = tokens_per_layer(L, sched, depth)
            if step_limit is not None and any(k > step_limit(tokens[i]) for i, k in enumerate(sched)):
                continue
            achieved = rate_of(tokens)
            err = abs(achieved - rate)
            if best is None or err < best[0] - 1e-12:
                best = (err, sched, achieved)
    return best


def _max_rate(depth, L, layers, step_unit, max_total, step_limit=None):
    """The highest rate reachable: remove as early as the token budget and the per-step limit allow."""
    left = L - 2 if max_total is None else max_total
    sched, n = [0] * (depth - 1), L
    for l in sorted(layers):  # front-load: earliest removals count for the most layers
        take = left if step_limit is None else min(left, step_limit(n))
        take = take // step_unit * step_unit
        sched[l], left, n = take, left - take, n - take
    return rate_of(tokens_per_layer(L, sched, depth))


def check_schedule(schedule, depth: int, layers: Sequence[int], step_unit: int, max_total: int | None,
                   method: str) -> list[int]:
    """A given schedule as a list of depth - 1 non-negative ints (an int: that many after every allowed
    layer; a shorter list is padded with zeros, i.e. no reduction after the remaining layers, and the eval
    says so in a note), checked against the allowed layers, the step unit and the token budget (ValueError
    otherwise).
    Entries are ints or numpy integers; floats (even 2.0), bools and strings are refused."""
    schedule = _entries(schedule, depth, layers, method)
    if not schedule:
        raise ValueError(f"{method}: the schedule is empty; give tokens removed after each layer, e.g. 4 or [0, 4, 4]")
    if len(schedule) > depth - 1:
        if len(schedule) == depth and schedule[-1] == 0:
            schedule = schedule[:-1]
        else:
            raise ValueError(f"{method}: schedule has {len(schedule)} entries; there are only {depth - 1} merge points "
                             f"(after layers 0..{depth - 2})")
    schedule = schedule + [0] * (depth - 1 - len(schedule))
    for i, k in enumerate(schedule):
        if k < 0:
            raise ValueError(f"{method}: schedule entries must be non-negative integers, got {k!r} after layer {i}")
        if k and i not in layers:
            raise ValueError(f"{method}: this configuration cannot reduce after layer {i} (allowed: {list(layers)})")
        if k % step_unit:
            raise ValueError(f"{method}: {k} tokens after layer {i}: with sides='both' each step removes the same number "
                             f"on each side, so entries must be even")
    if max_total is not None and sum(schedule) > max_total:
        raise ValueError(f"{method}: the schedule removes {sum(schedule)} tokens in total, more than the {max_total} "
                         f"this model can lose (a side must keep one token)")
    return [int(k) for k in schedule]


def check_step_limits(method: str, schedule: Sequence[int], tokens: Sequence[int],
                      step_limit: Callable[[int], int]) -> None:
    """ValueError if a step removes more than one step can take from the tokens it sees."""
    for i, k in enumerate(schedule):
        limit = step_limit(tokens[i])
        if k > limit:
            raise ValueError(f"{method}: cannot remove {k} tokens after layer {i}: with {tokens[i]} tokens left, one step "
                             f"removes at most {limit}; spread the schedule over more layers")
