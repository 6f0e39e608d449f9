"""The experiment grid of an eval run: which ``Experiment``s are evaluated, baseline first (docs/eval.md § Grid)."""

from __future__ import annotations

from ..reduction import STM_DEFAULTS, make_reduction
from .experiment import BASELINE, Experiment

__all__ = ["DEFAULT_RATES", "METHOD_GROUPS", "FLAVOUR_GROUPS", "STM_WEIGHT_VARIANTS", "MATCHED_PEERS", "experiments",
           "unique", "late_start"]

DEFAULT_RATES = (0.15, 0.2, 0.3, 0.4)
# the HSP ablations beside the default lsq: plain and size-weighted averages, dropping, the joint fit, the rest,
# and the positive control (merged tokens replaced by noise of their scale: what no merge rule can beat)
STM_WEIGHT_VARIANTS = ("avg", "drop", "size", "lsq_joint", "noise", "mean", "decay", "lsq_norm")
METHOD_GROUPS = ("none", "stm", "stm-oneside", "stm-weights", "stm-controls", "tome", "top", "evit", "mtr",
                 "tome-rmeeto", "top-released", "peers-matched")  # none: the baseline alone
FLAVOUR_GROUPS = {"tome-rmeeto": ("tome", "rmeeto"), "top-released": ("top", "released")}
MATCHED_PEERS = ("tome", "top", "evit", "mtr")  # peers that can reduce at any layers by any counts


def late_start(depth: int) -> int:
    """The first merging layer of the late-merges control: the second half of the network."""
    return depth // 2


def _stm_controls(rate, schedule, stm_options, cfg):
    """HSP against the plain average where merged tokens sit nearer the class token: uniform positions, and
    merges in the second half only, each with its noise control (dropped, with a note, where that cannot
    reach the rate)."""
    uniform = {**stm_options, "positions": "uniform"}
    late = {**stm_options, "start_layer": late_start(cfg.depth)}
    out, notes = [], []
    for opts in (uniform, late):
        pair = [Experiment.of("stm", rate, schedule, {**opts, "weights": w}) for w in ("lsq", "avg", "noise")]
        try:
            make_reduction(cfg, "stm", rate=None if schedule is not None else rate, schedule=schedule, **opts)
            out += pair
        except (ValueError, TypeError) as err:
            notes.append(f"{pair[0].cli} left out of stm-controls: {err}")
    return out, notes


def _matched(rate, schedule, stm_options, cfg):
    """Each peer of ``MATCHED_PEERS`` at STM's layers and per-layer counts (same 'when', other 'how')."""
    stm = make_reduction(cfg, "stm", rate=None if schedule is not None else rate, schedule=schedule, **stm_options)
    layers = [i for i, k in enumerate(stm.schedule) if k]
    return [Experiment.of(p, rate, list(stm.schedule), {"layers": layers}, note="at STM's layers and counts")
            for p in MATCHED_PEERS]


def _group(group, rate, schedule, stm_options, cfg):
    """(experiments, notes) of one method group at one rate (or schedule)."""
    if group == "none":
        return [], []  # the baseline is always the first experiment
    if group in FLAVOUR_GROUPS:  # a released rule may not express every rate: left out with a note
        method, flavour = FLAVOUR_GROUPS[group]
        e = Experiment.of(method, rate, schedule, {"flavour": flavour})
        try:
            make_reduction(cfg, method, rate=None if schedule is not None else rate, schedule=schedule, flavour=flavour)
        except (ValueError, TypeError) as err:
            return [], [f"{e.cli} left out of {group}: {err}"]
        return [e], []
    if group == "stm":
        return [Experiment.of("stm", rate, schedule, stm_options)], []
    if group == "stm-oneside":
        side = "right" if stm_options.get("sides", STM_DEFAULTS["sides"]) == "right" else "left"
        return [Experiment.of("stm", rate, schedule, {**stm_options, "sides": side})], []
    if group == "stm-weights":
        default = stm_options.get("weights", STM_DEFAULTS["weights"])
        return [Experiment.of("stm", rate, schedule, {**stm_options, "weights": w})
                for w in STM_WEIGHT_VARIANTS if w != default], []
    if group == "stm-controls":
        return _stm_controls(rate, schedule, stm_options, cfg)
    if group == "peers-matched":
        return _matched(rate, schedule, stm_options, cfg), []
    return [Experiment.of(group, rate, schedule)], []


def experiments(groups, rates, schedule, stm_options, cfg):
    """(experiments, notes): the ``Experiment``s to evaluate on models of configuration ``cfg``, baseline
    first, without duplicates, and one line for each control left out. ``schedule`` (tokens removed after
    each layer in total, docs/conventions.md §6) replaces the rates."""
    out, notes = [BASELINE], []
    points = [(None, schedule)] if schedule is not None else [(r, None) for r in rates]
    for g in groups:
        for rate, sched in points:
            exps, why = _group(g, rate, sched, stm_options, cfg)
            out += exps
            notes += why
    return unique(out), notes


def unique(exps):
    """The experiments without repetitions, in first-seen order."""
    return list(dict.fromkeys(exps))
