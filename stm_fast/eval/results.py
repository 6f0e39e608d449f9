"""The results of a finished run: counts and predictions summed over ranks, one record per (model,
experiment) with its paired statistics against the baseline, the claims, and the files of ``--out``."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from ..flops import flops
from ..runtime import atomic_write_json
from .claims import claims, claims_text, describe, experiment_key
from .figures import plot_accuracy_vs_flops
from .errors import NoImagesError
from .grid import exp_key
from .report import write_outputs
from .stats import agreement, paired_difference

__all__ = ["finish"]


def _gather(progress, keys, rank, world):
    counts = {k: dict(progress.counts.get(k, {"top1": 0, "top5": 0, "images": 0, "seconds": 0.0})) for k in keys}
    bad = [m for msgs in progress.bad.values() for m in msgs]
    if world > 1:
        t = torch.tensor([[counts[k]["top1"], counts[k]["top5"], counts[k]["images"], counts[k]["seconds"]] for k in keys],
                         dtype=torch.float64)
        torch.distributed.all_reduce(t)
        for k, row in zip(keys, t.tolist()):
            counts[k] = {"top1": int(row[0]), "top5": int(row[1]), "images": int(row[2]), "seconds": row[3] / world}
        lists = [None] * world
        torch.distributed.all_gather_object(lists, bad)
        bad = [m for part in lists for m in part]
    return counts, sorted(bad)


def _paired(pred, base, labels):
    """agreement with the baseline (%) and the accuracy difference to it with its interval."""
    valid = labels >= 0
    stat = paired_difference(pred[valid] == labels[valid], base[valid] == labels[valid])
    return agreement(pred, base, valid), {k: stat[k] for k in ("diff", "ci_low", "ci_high", "p_value")}


def _record(name, model, e, plan, count, bad, skipped, paired):
    """The result record of one (model, experiment); accuracy None when no image of the cell could be read."""
    method, rate, sched, options = e
    n = count["images"]
    paper = flops(model.cfg, convention="paper", reduction=plan)
    agree, vs_baseline = paired
    return {"model": name, "method": method, "rate": rate, "schedule": sched, "options": options,
            "achieved_rate": plan.rate, "tokens_per_layer": list(plan.tokens_per_layer),
            "top1": 100.0 * count["top1"] / n if n else None, "top5": 100.0 * count["top5"] / n if n else None,
            "agreement": agree, "vs_baseline": vs_baseline,
            "images": n, "bad_images": len(bad), "skipped_files": len(skipped),
            "gflops_paper": paper["total"], "gflops_full": flops(model.cfg, convention="full", reduction=plan)["total"],
            "gflops_overhead": paper["overhead"],
            "images_per_s": n / count["seconds"] if count["seconds"] > 0 else None}


def _pooled(names, exp_a, exp_b, labels, preds):
    """Paired statistics of two experiments pooled over the models (each model's images with themselves)."""
    valid = labels >= 0
    a = np.concatenate([preds[exp_key(n, exp_a)][valid] == labels[valid] for n in names])
    b = np.concatenate([preds[exp_key(n, exp_b)][valid] == labels[valid] for n in names])
    return paired_difference(a, b)


def _summaries(run, names, labels, preds):
    """(pooled vs-baseline stats by (label, point), STM ablations against the plain average)."""
    base = ("none", 0.0, None, {})
    pooled = {}
    for e in run.exps:
        point = json.dumps(e[1] if e[2] is None else f"schedule {e[2]}")
        pooled[(describe(e[0], e[3]), point)] = _pooled(names, e, base, labels, preds)
    ablations = []
    for e in run.exps:
        method, rate, sched, options = e
        avg = ("stm", rate, sched, {**run.args.stm_options, "weights": "avg"})
        if method != "stm" or options == avg[3] or avg not in [tuple(x) for x in run.exps] or sched is not None:
            continue
        ablations.append({"variant": describe(method, options), "rate": rate, **_pooled(names, e, avg, labels, preds)})
    return pooled, ablations


def finish(run, skipped):
    """Records, claims.json and the other files; the table and the claims printed. None on ranks > 0."""
    keys = list(run.plans)
    counts, bad = _gather(run.progress, keys, run.rank, run.world)
    labels, preds = run.store.gather(keys, run.world)
    if run.rank != 0:
        return None
    base = ("none", 0.0, None, {})
    records = [{**_record(name, model, e, run.plans[exp_key(name, e)], counts[exp_key(name, e)], bad, skipped,
                          _paired(preds[exp_key(name, e)], preds[exp_key(name, base)], labels)),
                "self_check": getattr(run.args, "self_check_record", None)}
               for name, model in run.models for e in run.exps]
    names = [name for name, _ in run.models]
    achieved = {experiment_key(e): run.plans[exp_key(names[0], e)].rate for e in run.exps}
    found = claims(names, run.exps, {n: labels for n in names}, preds, {**run.args.stm_options, "sides": "both"}
                   if run.args.paper else run.args.stm_options, achieved)
    atomic_write_json(os.path.join(run.args.out, "claims.json"), found, indent=1)
    pooled, ablations = _summaries(run, names, labels, preds)
    table = write_outputs(run.args.out, records, bad, skipped, pooled)
    data = "the digits test split" if run.args.data is None else f"ImageNet val ({os.path.basename(os.path.abspath(run.args.data))})"
    plot_accuracy_vs_flops(os.path.join(run.args.out, "accuracy_vs_flops.png"), records,
                           describe("stm", run.args.stm_options), ablations,
                           f"{data}: {len(names)} model(s), {records[0]['images']} images each")
    if not run.args.quiet:
        print(table + "\n\n" + claims_text(found))
        print(f"\nresults: {os.path.join(run.args.out, 'results.json')} (+ claims.json, results.csv, table.md, "
              f"accuracy_vs_flops.png)")
    empty = [r for r in records if r["top1"] is None]
    if empty:
        raise NoImagesError(f"no image of {len(empty)} cell(s) could be read (accuracy n/a in {run.args.out}/table.md); "
                            f"see the bad_image_files in results.json")
    return records
