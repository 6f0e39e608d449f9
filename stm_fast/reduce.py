"""Token reduction for Vision Mamba: one API for STM and its peers, ToMe-style (``reduce`` patches the model).

``stm_fast.reduce(model, method, rate=None, schedule=None, **options)`` installs a reducer on the model
and returns it; ``reduce(model, "none")`` removes it. A reducer runs between layers: after layer i it
turns the token stream x = residual + mixer output of L_i tokens (what layer i + 1 adds up first; the
forward forms that sum one layer early, so no work is added) into one of L_i - k_i tokens, which layer
i + 1 takes as its residual with nothing left to add. Every reduction here is linear in the tokens with
weights fixed by the step, so this equals reducing the residual and the mixer output separately with the
same weights (SPEC's "merges apply to both streams"), in half the work. The class token is tracked per
image (its index can differ between images for data-dependent methods).

Rates follow SPEC §6: N_l tokens enter layer l (N_0 = L), rate = 1 - sum_l N_l / (depth * N_0). A
requested rate is met within ±1 percentage point by a schedule of k_i (tokens removed after layer i) that
is as uniform as possible over the layers the method reduces at; the schedule used is reported in
``model.reduction``. Methods: ``stm`` (here), ``tome``, ``top``, ``evit`` (``stm_fast.peers``), ``none``.
"""

from __future__ import annotations

import torch

from .merge import TOKEN_WEIGHT_VARIANTS, ends_weights, merge_ends, merge_tokens, plan_index, token_weights

__all__ = ["reduce", "METHODS", "solve_schedule", "Reducer", "STMReducer", "rate_of"]


class Reducer:
    """Base class: runs the layers, calling ``step`` after each layer with k_i > 0."""

    method = "?"
    keeps_stats = True  # whether step() needs the statistics of the layer just run

    def __init__(self, model, schedule, options):
        self.schedule = list(schedule)
        self.options = dict(options)
        self.active = any(k > 0 for k in self.schedule)

    def decay_scales(self, state):
        """Per-direction decay scales (batch, L) for the next layer, or None (no alignment)."""
        return None

    def stats_head(self, k):
        """How many leading scan steps' delta/Abar a layer followed by a k-token step should export (0: none)."""
        return 0

    def forward_features(self, model, hidden, observer=None):
        batch, L, _ = hidden.shape
        state = {
            "cls": torch.full((batch,), model.token_position, dtype=torch.long, device=hidden.device),
            "pos": torch.arange(L, device=hidden.device).expand(batch, L),
            "size": torch.ones(batch, L, dtype=torch.float32 if hidden.dtype != torch.float64 else hidden.dtype,
                               device=hidden.device),
            "uniform_cls": model.token_position,  # an int while every image has the same class index
        }
        residual = None
        for i, layer in enumerate(model.layers):
            k = self.schedule[i] if i < len(self.schedule) else 0
            layer.mixer.keep_stats = k > 0 and self.keeps_stats
            layer.mixer.stats_head = self.stats_head(k) if layer.mixer.keep_stats else 0
            try:
                hidden, residual = layer(hidden, residual, decay_scale=self.decay_scales(state))
                if k > 0:  # the stream the next layer would add up, reduced; it becomes that layer's residual
                    x = residual.add_(hidden) if not torch.is_grad_enabled() else residual + hidden
                    hidden, state = self.step(i, k, x, state, layer.mixer.stats)
                    residual = None
                if observer is not None:
                    rows = torch.arange(batch, device=hidden.device)
                    cls = state["cls"]
                    observer(i, hidden[rows, cls] if residual is None else residual[rows, cls] + hidden[rows, cls])
            finally:
                layer.mixer.keep_stats = False
                layer.mixer.stats_head = 0
                layer.mixer.stats = None
        out = model.norm_f(hidden if residual is None else residual + hidden)
        if state["uniform_cls"] is not None:
            return out[:, state["uniform_cls"]]
        return out[torch.arange(batch, device=out.device), state["cls"]]

    def step(self, i, k, x, state, stats):  # pragma: no cover - abstract
        """Reduce the stream x (batch, L, d) after layer i by k tokens: returns (x', state')."""
        raise NotImplementedError

    @staticmethod
    def max_per_step(L, cls):
        """Most tokens one step can remove from L (the class token and one other token always stay)."""
        return L - 2

    def overhead_flops(self, cfg, L, k):
        """Multiply-adds of one reduction step removing k of L tokens (selection + merge), per image."""
        return 0


class STMReducer(Reducer):
    """STM: BNNM plan (SPEC §3) and HSP weights (SPEC §4, eq. 11) from the layer just run."""

    method = "stm"

    def split(self, k):
        sides = self.options["sides"]
        if sides == "both":
            return k // 2, k // 2
        return (k, 0) if sides == "left" else (0, k)

    def stats_head(self, k):
        # the ends plan reads only each direction's first r + 1 scan steps: reuse the scan's delta and Abar there
        if self.options["positions"] != "ends" or self.options["weights"] in ("avg", "drop"):
            return 0
        return max(self.split(k)) + 1

    def overhead_flops(self, cfg, L, k):
        # weights: per reduced token, P = exp(A * S) and the lsq products over (E, N) (~4 E N), plus the
        # merge itself: a multiply-add of d channels on the stream
        weights = 0 if self.options["weights"] in ("avg", "drop") else 4 * k * cfg.d_inner * cfg.d_state
        return weights + k * cfg.embed_dim

    def step(self, i, k, x, state, stats):
        L = x.shape[1]
        cls = state["uniform_cls"]
        r_left, r_right = self.split(k)
        plan = plan_index(L, cls, r_left, r_right, self.options["positions"], x.device)
        variant = self.options["weights"]
        # the stream belongs to this forward: merge into it in place (a view for ends plans)
        inplace = not torch.is_grad_enabled()
        if plan.ends is not None:  # slices and one small matrix product per side, weights kept split by side
            w = (None, None) if variant == "drop" else ends_weights(stats, r_left, r_right, variant)
            x = merge_ends(x, r_left, r_right, *w, variant, inplace=inplace)
        else:
            w = None if variant == "drop" else token_weights(stats, plan, variant)
            x = merge_tokens(x, plan, w, variant, inplace=inplace)
        state = dict(state, uniform_cls=plan.new_cls, cls=torch.full_like(state["cls"], plan.new_cls),
                     pos=plan.take(state["pos"]), size=plan.take(state["size"]))
        return x, state


def rate_of(tokens_per_layer):
    """SPEC §6: 1 - sum_l N_l / (depth * N_0)."""
    return 1.0 - sum(tokens_per_layer) / (len(tokens_per_layer) * tokens_per_layer[0])


def tokens_per_layer(L, schedule, depth):
    n, out = L, []
    for i in range(depth):
        out.append(n)
        n -= schedule[i] if i < len(schedule) else 0
    return out


def solve_schedule(depth, L, rate, layers, granularity=1, max_total=None, step_limit=None):
    """Tokens removed after each layer (list of length depth - 1) meeting ``rate`` within ±1 point.

    k_i = granularity * m_i with m_i in {m, m+1} over the reduction points, the extra units spread
    evenly; the (m, extras) pair closest to the rate wins. When the token budget ``max_total`` makes that
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
        best = _uniform_schedule(depth, L, rate, layers[:n], granularity, max_total, step_limit)
        if best is not None and (closest is None or best[0] < closest[0]):
            closest = best
        if best is not None and best[0] <= 0.01:
            return best[1]
    hi = _max_rate(depth, L, layers, granularity, max_total, step_limit)
    got = f"; the closest schedule gives {100 * closest[2]:.1f}%" if closest else ""
    raise ValueError(
        f"cannot reach a token reduction rate of {100 * rate:.1f}% within ±1 point{got}. With these options "
        f"the feasible rates run from 0 to {100 * hi:.1f}% (layers reduced at: {layers[0]}..{layers[-1]}, "
        f"{granularity} token(s) per step unit); pass schedule=[...] for full control")


def _uniform_schedule(depth, L, rate, layers, granularity, max_total, step_limit=None):
    target = rate * depth * L  # token-layers to remove
    W = sum(depth - 1 - l for l in layers)
    best = None
    base = int(target // (granularity * W))
    for m in (base - 1, base, base + 1):
        if m < 0:
            continue
        for extra in range(len(layers) + 1):
            chosen = {layers[int((e + 0.5) * len(layers) / extra)] for e in range(extra)} if extra else set()
            sched = [0] * (depth - 1)
            for l in layers:
                sched[l] = granularity * (m + (l in chosen))
            if max_total is not None and sum(sched) > max_total:
                continue
            tpl = tokens_per_layer(L, sched, depth)
            if step_limit is not None and any(k > step_limit(tpl[i]) for i, k in enumerate(sched)):
                continue
            achieved = rate_of(tpl)
            err = abs(achieved - rate)
            if best is None or err < best[0] - 1e-12:
                best = (err, sched, achieved)
    return best


def _max_rate(depth, L, layers, granularity, max_total, step_limit=None):
    """The highest rate reachable: remove as early as the token budget and the per-step limit allow."""
    left = L - 2 if max_total is None else max_total
    sched, n = [0] * (depth - 1), L
    for l in sorted(layers):  # front-load: earliest removals count for the most layers
        take = left if step_limit is None else min(left, step_limit(n))
        take = take // granularity * granularity
        sched[l], left, n = take, left - take, n - take
    return rate_of(tokens_per_layer(L, sched, depth))


_STM_DEFAULTS = dict(sides="both", positions="ends", weights="lsq", start_layer=0)


def _check_options(method, options, defaults):
    bad = sorted(set(options) - set(defaults))
    if bad:
        raise TypeError(f"reduce(..., '{method}'): unknown option(s) {bad}; allowed: {', '.join(sorted(defaults))}")
    return {**defaults, **options}


def _stm_setup(model, options):
    opts = _check_options("stm", options, _STM_DEFAULTS)
    if opts["sides"] not in ("both", "left", "right"):
        raise ValueError(f"stm: sides must be 'both', 'left' or 'right', got {opts['sides']!r}")
    if opts["positions"] not in ("ends", "uniform"):
        raise ValueError(f"stm: positions must be 'ends' or 'uniform', got {opts['positions']!r}")
    if opts["weights"] not in TOKEN_WEIGHT_VARIANTS:
        raise ValueError(f"stm: weights must be one of {TOKEN_WEIGHT_VARIANTS}, got {opts['weights']!r}")
    depth = model.cfg.depth
    start = int(opts["start_layer"])
    if not 0 <= start <= depth - 2:
        raise ValueError(f"stm: start_layer must be in 0..{depth - 2} (merges happen between layers), got {start}")
    c = model.token_position
    n_left, n_right = c, model.cfg.num_patches - c
    side = {"both": min(n_left, n_right), "left": n_left, "right": n_right}[opts["sides"]]
    gran = 2 if opts["sides"] == "both" else 1
    max_total = gran * max(side - 1, 0)
    return opts, list(range(start, depth - 1)), gran, max_total


def _validate_schedule(model, schedule, layers, gran, max_total, method):
    depth = model.cfg.depth
    if isinstance(schedule, int):
        schedule = [schedule if i in layers else 0 for i in range(depth - 1)]
    schedule = list(schedule)
    if len(schedule) > depth - 1:
        if len(schedule) == depth and schedule[-1] == 0:
            schedule = schedule[:-1]
        else:
            raise ValueError(f"{method}: schedule has {len(schedule)} entries; there are only {depth - 1} merge points "
                             f"(after layers 0..{depth - 2})")
    schedule = schedule + [0] * (depth - 1 - len(schedule))
    for i, k in enumerate(schedule):
        if int(k) != k or k < 0:
            raise ValueError(f"{method}: schedule entries must be non-negative integers, got {k!r} after layer {i}")
        if k and i not in layers:
            raise ValueError(f"{method}: this configuration cannot reduce after layer {i} (allowed: {layers})")
        if k % gran:
            raise ValueError(f"{method}: {k} tokens after layer {i}: with sides='both' each step removes the same number "
                             f"on each side, so entries must be even")
    if max_total is not None and sum(schedule) > max_total:
        raise ValueError(f"{method}: the schedule removes {sum(schedule)} tokens in total, more than the {max_total} "
                         f"this model can lose (a side must keep one token)")
    return [int(k) for k in schedule]


def reduce(model, method, rate=None, schedule=None, **options):
    """Patch ``model`` in place with a token reduction and return it (``method="none"`` undoes it).

    ``rate``: SPEC §6's token reduction rate in [0, 1), met within ±1 point (else ValueError naming what is
    feasible); or ``schedule``: tokens removed after each layer (an int applies to every allowed layer; for
    ``stm`` with sides='both' an entry of 2k removes k per side). ``model.reduction`` then describes the
    method, options, schedule, tokens per layer and the achieved rate.

    ``stm`` options: sides ('both'|'left'|'right'), positions ('ends'|'uniform'),
    weights ('lsq'|'mean'|'decay'|'lsq_norm'|'avg'|'drop'), start_layer. Peers: see ``stm_fast.peers``.
    """
    if method == "none":
        if rate not in (None, 0) or (schedule is not None and any(schedule if not isinstance(schedule, int) else [schedule])):
            raise ValueError("method 'none' takes no rate or schedule")
        model.reducer = None
        model.reduction = {"method": "none", "options": {}, "schedule": [0] * (model.cfg.depth - 1),
                           "tokens_per_layer": [model.cfg.num_patches + 1] * model.cfg.depth, "rate": 0.0,
                           "requested_rate": 0.0}
        return model
    if method not in METHODS:
        raise ValueError(f"unknown reduction method {method!r}; choose one of {', '.join(['none', *METHODS])}")
    if (rate is None) == (schedule is None):
        raise ValueError(f"reduce(..., '{method}'): give exactly one of rate= or schedule=")
    if rate is not None and not (0 <= rate < 1):
        raise ValueError(f"rate must be in [0, 1), got {rate!r} (0.2 means 20%)")
    setup, cls = METHODS[method]
    opts, layers, gran, max_total = setup(model, options)
    depth, L = model.cfg.depth, model.cfg.num_patches + 1
    if schedule is None:
        schedule = solve_schedule(depth, L, rate, layers, gran, max_total,
                                  lambda n: cls.max_per_step(n, model.token_position))
    else:
        schedule = _validate_schedule(model, schedule, layers, gran, max_total, method)
    reducer = cls(model, schedule, opts)
    tpl = tokens_per_layer(L, schedule, depth)
    for i, k in enumerate(schedule):
        limit = reducer.max_per_step(tpl[i], model.token_position)
        if k > limit:
            raise ValueError(f"{method}: cannot remove {k} tokens after layer {i}: with {tpl[i]} tokens left, one step "
                             f"removes at most {limit}; spread the schedule over more layers")
    model.reducer = reducer if reducer.active else None
    model.reduction = {"method": method, "options": opts, "schedule": schedule, "tokens_per_layer": tpl,
                       "rate": rate_of(tpl), "requested_rate": rate,
                       "overhead_flops_per_layer": [reducer.overhead_flops(model.cfg, tpl[i], k) if k else 0
                                                    for i, k in enumerate(schedule)]}
    return model


METHODS = {"stm": (_stm_setup, STMReducer)}

from . import peers as _peers  # noqa: E402  (peers subclasses Reducer, defined above)

METHODS.update(_peers.METHODS)
