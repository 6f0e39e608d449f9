"""Token reductions of the float64 reference Vim, one image at a time (twins of stm_fast.reduce / peers).

Each step has the signature ``step(k, hidden, residual, state, stats, options) -> (hidden, residual, state)``:
``hidden`` is the mixer output and ``residual`` the residual stream of the layer just run, both (L, d);
``state`` = {"cls": class index, "pos": original positions (L,), "size": merged-token sizes (L,)};
``stats`` = {"forward"/"backward": {delta (E, L) after softplus, B, C (N, L), A (E, N), y (E, L)}} in token
position order. Everything is written per token with explicit loops where that is clearer.

Methods (``STEPS``): ``stm`` (SPEC §3-4), and the peers of ``stm_fast.peers`` whose module docstring defines
them: ``tome`` (bipartite soft matching), ``top`` (ToP-ViM pruning, with its hidden-state alignment in
``decay_scales``), ``evit`` (class-token attention pruning with fusion). Data-dependent choices have no ties
for generic (random) inputs; where they tie, sorts here are stable (lower index first).
"""

from __future__ import annotations

import numpy as np

from . import merge, ssm

__all__ = ["STEPS", "stm_step", "tome_step", "top_step", "evit_step", "decay_scales", "top_scales",
           "top_importance", "class_attention"]


def _euler(stats):
    """Per direction: Abar, Bbar (L, E, N) with Mamba's Euler discretisation."""
    return ssm.discretize(stats["delta"].T, stats["A"], stats["B"].T, "euler")


def stm_step(k, hidden, residual, state, stats, options):
    """STM (SPEC §3-4): BNNM plan, scalar weights of eq. 11 from this layer's statistics, same merge on both streams."""
    sides = options.get("sides", "both")
    r_left, r_right = {"both": (k // 2, k // 2), "left": (k, 0), "right": (0, k)}[sides]
    L = hidden.shape[0]
    plan = merge.merge_plan(L, state["cls"], r_left, r_right, options.get("positions", "ends"))
    variant = options.get("weights", "lsq")
    weights = {}
    for direction in ("forward", "backward"):
        Abar, Bbar = _euler(stats[direction])
        weights.update(merge.token_weights(Abar, Bbar, plan, direction, variant))
    hidden = merge.merge_tokens(hidden, plan, weights, variant)
    residual = merge.merge_tokens(residual, plan, weights, variant)
    state = {"cls": plan.new_cls, "pos": state["pos"][plan.kept], "size": state["size"][plan.kept]}
    return hidden, residual, state


STEPS = {"stm": stm_step}


def decay_scales(method, options, state):
    """Abar scales (forward, backward) for the next layer, or None. Only ToP-style alignment uses them."""
    hook = _SCALES.get(method)
    return None if hook is None else hook(options, state)


_SCALES = {}


# --------------------------------------------------------------------------------------------------
# The peers (twins of stm_fast.peers, whose module docstring defines them), one image at a time.
# --------------------------------------------------------------------------------------------------


def _unit(v):
    """v / max(|v|, 1e-12) (the cosine-similarity metric)."""
    return v / max(float(np.sqrt(np.sum(v * v))), 1e-12)


def _kept_state(state, kept, size=None):
    """The state after keeping the ascending positions ``kept`` (the class token among them)."""
    cls = state["cls"]
    if cls not in kept:
        raise AssertionError("a reduction step must keep the class token")
    size = state["size"] if size is None else size
    return {"cls": kept.index(cls), "pos": state["pos"][kept], "size": size[kept]}


def tome_step(k, hidden, residual, state, stats, options):
    """ToMe: bipartite soft matching on alternating tokens, the k best-matched even tokens merged.

    Sources are the tokens at even indices of the current sequence, destinations those at odd indices; the
    class token is neither. Each source's best destination is the one of highest cosine similarity of the
    next block's input (residual + hidden); the k sources with the highest best similarity merge into their
    destination by size-weighted average (sizes add up), on both streams. Order is kept.
    """
    L = hidden.shape[0]
    cls = state["cls"]
    x = residual + hidden
    metric = [_unit(x[t]) for t in range(L)]
    sources = [t for t in range(0, L, 2) if t != cls]
    dests = [t for t in range(1, L, 2) if t != cls]
    if k > len(sources):
        raise ValueError(f"tome: cannot merge {k} tokens: only {len(sources)} sources among {L} tokens")
    if not dests:
        raise ValueError(f"tome: no destination token among {L} tokens (class token at {cls})")
    best_sim, best_dst = {}, {}
    for a in sources:
        sims = [float(metric[a] @ metric[b]) for b in dests]
        j = int(np.argmax(sims))  # first of equal maxima (random data has none)
        best_sim[a], best_dst[a] = sims[j], dests[j]
    chosen = sorted(sources, key=lambda a: -best_sim[a])[:k]  # stable: ties keep index order
    size = state["size"].astype(np.float64).copy()
    new_hidden, new_residual, new_size = hidden.copy(), residual.copy(), size.copy()
    for b in dests:
        group = [b] + [a for a in chosen if best_dst[a] == b]
        if len(group) == 1:
            continue
        mass = sum(size[t] for t in group)
        new_hidden[b] = sum(size[t] * hidden[t] for t in group) / mass
        new_residual[b] = sum(size[t] * residual[t] for t in group) / mass
        new_size[b] = mass
    kept = [t for t in range(L) if t not in chosen]
    return new_hidden[kept], new_residual[kept], _kept_state(state, kept, new_size)


def top_importance(stats):
    """ToP-ViM importance of each token: sum over channels of max(y, 0), summed over both directions. (L,)"""
    L = stats["forward"]["y"].shape[1]
    imp = np.zeros(L)
    for direction in ("forward", "backward"):
        y = stats[direction]["y"]
        for t in range(L):
            imp[t] += np.sum(np.maximum(y[:, t], 0.0))
    return imp


def top_step(k, hidden, residual, state, stats, options):
    """ToP-ViM: drop the k least important tokens (``top_importance``); the class token always stays; order kept."""
    L = hidden.shape[0]
    cls = state["cls"]
    if k > L - 1:
        raise ValueError(f"top: cannot drop {k} of {L} tokens (the class token stays)")
    imp = top_importance(stats)
    others = sorted((t for t in range(L) if t != cls), key=lambda t: -imp[t])
    kept = sorted([cls] + others[: L - 1 - k])
    return hidden[kept], residual[kept], _kept_state(state, kept)


def top_scales(options, state):
    """ToP-ViM hidden-state alignment: Abar of a kept token decays over the whole gap its pruned
    predecessors (in scan order) left: forward pos[t] - pos[t-1] (1 at t = 0), backward pos[t+1] - pos[t]
    (1 at the last token). None while nothing was pruned, or with ``align=False``."""
    if not options.get("align", True):
        return None
    pos = [int(p) for p in state["pos"]]
    n = len(pos)
    if n == 0 or pos == list(range(n)):
        return None
    forward = np.ones(n)
    backward = np.ones(n)
    for t in range(1, n):
        forward[t] = pos[t] - pos[t - 1]
    for t in range(n - 1):
        backward[t] = pos[t + 1] - pos[t]
    return forward, backward


def class_attention(stats, cls):
    """EViT importance (eq. 5): mean over channels of |alpha[d, cls, j]|, the class token's row of the hidden
    attention (Euler Abar, Bbar), from the forward direction for j < cls and the backward one for j > cls. (L,); 0 at cls.
    """
    fwd, bwd = stats["forward"], stats["backward"]
    L = fwd["delta"].shape[1]
    imp = np.zeros(L)
    Abar, Bbar = _euler(fwd)
    alpha = ssm.hidden_attention(Abar, Bbar, fwd["C"].T)  # (E, L, L), alpha[:, t, j] for j <= t
    for j in range(cls):
        imp[j] = np.mean(np.abs(alpha[:, cls, j]))
    # Backward: scan the flipped sequence (position t sits at index L-1-t), then map back.
    flipped = {"delta": bwd["delta"][:, ::-1], "A": bwd["A"], "B": bwd["B"][:, ::-1]}
    Abar, Bbar = _euler(flipped)
    alpha = ssm.hidden_attention(Abar, Bbar, bwd["C"][:, ::-1].T)
    for j in range(cls + 1, L):
        imp[j] = np.mean(np.abs(alpha[:, L - 1 - cls, L - 1 - j]))
    return imp


def evit_step(k, hidden, residual, state, stats, options):
    """EViT-style token recognition: the k+1 least important tokens (``class_attention``) are fused into one by
    importance-weighted average (uniform if their importances are all 0), placed at the position of the most
    important of them; the other k are dropped. The class token stays; order kept."""
    L = hidden.shape[0]
    cls = state["cls"]
    if k + 1 > L - 1:
        raise ValueError(f"evit: cannot fuse {k + 1} of {L} tokens (the class token stays)")
    imp = class_attention(stats, cls)
    pruned = sorted((t for t in range(L) if t != cls), key=lambda t: imp[t])[: k + 1]  # least important first
    host = pruned[-1]
    w = np.array([imp[t] for t in pruned])
    if not w.sum() > 0:
        w = np.ones(len(pruned))
    w = w / w.sum()
    hidden, residual = hidden.copy(), residual.copy()
    hidden[host] = sum(wi * hidden[t] for wi, t in zip(w, pruned))
    residual[host] = sum(wi * residual[t] for wi, t in zip(w, pruned))
    kept = [t for t in range(L) if t not in pruned[:-1]]
    return hidden[kept], residual[kept], _kept_state(state, kept)


STEPS.update(tome=tome_step, top=top_step, evit=evit_step)
_SCALES["top"] = top_scales
