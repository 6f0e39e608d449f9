"""The paper's claims as paired comparisons on the run's own images, with a verdict (``claims.json``).

For each model and each rate (or schedule) of the run, and pooled over its models (each model's images
paired with themselves, then put together):

1. ``HSP vs plain average``: STM with its weights against the same STM with ``weights="avg"``;
2. ``HSP vs drop``: against ``weights="drop"`` (the same positions, nothing merged);
3. ``both sides vs one side``: STM on both sides against STM on one side;
4. ``STM vs <peer>``: against every peer configuration evaluated at the same rate (the peers' released
   flavours included);
5. ``<peer> <flavour> flavour vs paper``: a peer's released flavour against our paper-described version.

Each record: claim, model, rate, a, b (the two configurations), diff (accuracy of a minus b, points),
ci_low, ci_high (paired bootstrap 95%), p_value (exact McNemar), verdict, n_images. A claim whose two
configurations were not both evaluated is left out.
"""

from __future__ import annotations

import json

import numpy as np

from ..reduction import STM_DEFAULTS
from .grid import exp_key
from .stats import paired_difference, verdict

__all__ = ["claims", "claims_text", "describe", "experiment_key"]


def experiment_key(e):
    """The JSON text of an experiment (its key in ``achieved``)."""
    return json.dumps(list(e), sort_keys=True)


def describe(method, options):
    """'stm (both sides, lsq weights)' / 'tome': how a configuration is named in claims and tables."""
    if method != "stm":
        extra = ", ".join(f"{k}={v}" for k, v in options.items())
        return f"{method} ({extra})" if extra else method
    o = {**STM_DEFAULTS, **options}
    sides = "both sides" if o["sides"] == "both" else f"one side ({o['sides']})"
    weights = f"{o['weights']} weights"
    extra = [f"{k}={o[k]}" for k in ("positions", "start_layer") if o[k] != STM_DEFAULTS[k]]
    return f"stm ({', '.join([sides, weights, *extra])})"


def _stm_at(point, stm_options, achieved, exps):
    """STM's experiment compared with a peer at ``point``: at the same point, else (the paper's settings, where
    STM runs a schedule and the peers a rate) STM at a schedule whose achieved rate is that rate (±0.5 point)."""
    rate, sched = point
    same = ("stm", rate, sched, dict(stm_options))
    if same in exps or rate is None:
        return same
    for e in exps:
        if e[0] == "stm" and e[3] == stm_options and e[2] is not None and abs(achieved[_key(e)] - rate) <= 0.005:
            return e
    return same


_key = experiment_key


def _pairs(points, stm_options, peers, achieved, exps):
    """[(claim, experiment a, experiment b)] that the grid makes possible."""
    out = []
    for rate, sched in points:
        a = ("stm", rate, sched, dict(stm_options))
        for w, claim in (("avg", "HSP vs plain average"), ("drop", "HSP vs drop")):
            if stm_options.get("weights", "lsq") != w:
                out.append((claim, a, ("stm", rate, sched, {**stm_options, "weights": w})))
        side = "right" if stm_options.get("sides", "both") == "right" else "left"
        if stm_options.get("sides", "both") == "both":
            out.append(("both sides vs one side", a, ("stm", rate, sched, {**stm_options, "sides": side})))
        at_point = [e for e in exps if e[0] in peers and e[1] == rate and e[2] == sched]
        out += [(f"STM vs {describe(e[0], e[3])}", _stm_at((rate, sched), stm_options, achieved, exps), e) for e in at_point]
        out += [(f"{e[0]} {e[3]['flavour']} flavour vs paper", e, (e[0], rate, sched, {})) for e in at_point
                if e[3].get("flavour") and (e[0], rate, sched, {}) in exps]
    return out


def _record(claim, model, exp_a, exp_b, correct_a, correct_b):
    stat = paired_difference(correct_a, correct_b)
    point = exp_a[2] if exp_a[2] is not None else exp_a[1]
    return {"claim": claim, "model": model, "rate": point, "a": describe(exp_a[0], exp_a[3]),
            "b": describe(exp_b[0], exp_b[3]), "diff": stat["diff"], "ci_low": stat["ci_low"], "ci_high": stat["ci_high"],
            "p_value": stat["p_value"], "verdict": verdict(stat["diff"], stat["p_value"]), "n_images": stat["n_images"]}


def claims(model_names, exps, labels, preds, stm_options, achieved=None):
    """Claim records (see the module docstring) from per-image predictions {exp_key: array} and labels;
    ``achieved``: {json of an experiment: achieved rate} (to pair a peer's rate with STM's schedule)."""
    keys = {exp_key(m, e) for m in model_names for e in exps}
    peers = sorted({e[0] for e in exps if e[0] not in ("none", "stm")})
    out = []
    exps = [tuple(e) for e in exps]
    points = [json.loads(p) for p in dict.fromkeys(json.dumps([e[1], e[2]]) for e in exps if e[0] != "none")]
    for claim, exp_a, exp_b in _pairs(points, stm_options, peers, achieved or {}, exps):
        if not all(exp_key(m, e) in keys for m in model_names for e in (exp_a, exp_b)):
            continue
        pooled_a, pooled_b = [], []
        for m in model_names:
            valid = labels[m] >= 0
            ca = preds[exp_key(m, exp_a)][valid] == labels[m][valid]
            cb = preds[exp_key(m, exp_b)][valid] == labels[m][valid]
            out.append(_record(claim, m, exp_a, exp_b, ca, cb))
            pooled_a.append(ca)
            pooled_b.append(cb)
        if len(model_names) > 1:
            out.append(_record(claim, f"pooled ({len(model_names)} models)", exp_a, exp_b, np.concatenate(pooled_a),
                               np.concatenate(pooled_b)))
    return out


def claims_text(records):
    """The "Claims" section printed after the table: the pooled (or single-model) records."""
    pooled = [r for r in records if r["model"].startswith("pooled")] or records
    if not pooled:
        return ""
    lines = ["Claims (paired on the same images; difference of top-1 in points, a - b, with its bootstrap 95% "
             "interval and the exact McNemar p-value; verdict at 95%):"]
    for r in pooled:
        rate = f"{100 * r['rate']:.0f}%" if isinstance(r["rate"], float) else f"schedule {r['rate']}"
        lines.append(f"- {r['claim']} at {rate}: {r['diff']:+.1f} [{r['ci_low']:+.1f}, {r['ci_high']:+.1f}], "
                     f"p = {r['p_value']:.2g}: {r['verdict']} ({r['model']}, {r['n_images']} images)")
    return "\n".join(lines)
