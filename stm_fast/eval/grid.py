"""The experiment grid of an eval run: which (method, rate or schedule, options) are evaluated, baseline first."""

from __future__ import annotations

import json

from ..reduction import STM_DEFAULTS

__all__ = ["DEFAULT_RATES", "METHOD_GROUPS", "FLAVOUR_GROUPS", "STM_WEIGHT_VARIANTS", "experiments", "exp_key", "unique"]

DEFAULT_RATES = (0.15, 0.2, 0.3, 0.4)
STM_WEIGHT_VARIANTS = ("avg", "drop", "mean", "decay", "lsq_norm")  # the HSP ablations beside the default lsq
METHOD_GROUPS = ("none", "stm", "stm-oneside", "stm-weights", "tome", "top", "evit", "mtr", "tome-rmeeto",
                 "top-released")  # none: the baseline alone; *-rmeeto / *-released: the peers' released code
FLAVOUR_GROUPS = {"tome-rmeeto": ("tome", "rmeeto"), "top-released": ("top", "released")}


def _group(group, rate, schedule, stm_options):
    """The experiments of one method group at one rate (or schedule)."""
    if group == "none":
        return []  # the baseline is always the first experiment
    if group in FLAVOUR_GROUPS:
        method, flavour = FLAVOUR_GROUPS[group]
        return [(method, rate, schedule, {"flavour": flavour})]
    if group == "stm":
        return [("stm", rate, schedule, dict(stm_options))]
    if group == "stm-oneside":
        side = "right" if stm_options.get("sides", STM_DEFAULTS["sides"]) == "right" else "left"
        return [("stm", rate, schedule, {**stm_options, "sides": side})]
    if group == "stm-weights":
        default = stm_options.get("weights", STM_DEFAULTS["weights"])
        return [("stm", rate, schedule, {**stm_options, "weights": w}) for w in STM_WEIGHT_VARIANTS if w != default]
    return [(group, rate, schedule, {})]


def experiments(groups, rates, schedule, stm_options):
    """The list of (method, rate, schedule, options) to evaluate, baseline first, without duplicates.
    ``schedule`` (tokens removed after each layer in total, docs/conventions.md §6) replaces the rates."""
    out = [("none", 0.0, None, {})]
    points = [(None, schedule)] if schedule is not None else [(r, None) for r in rates]
    for g in groups:
        for rate, sched in points:
            out += _group(g, rate, sched, stm_options)
    return unique(out)


def unique(exps):
    """The experiments without repetitions, in first-seen order."""
    seen, out = set(), []
    for e in exps:
        k = json.dumps(e, sort_keys=True)
        if k not in seen:
            seen.add(k)
            out.append(e)
    return out


def exp_key(model_name, exp):
    """The key of one (model, experiment) in progress files."""
    method, rate, sched, options = exp
    return json.dumps([model_name, method, rate, sched, options], sort_keys=True)
