"""The results of a finished run: counts and predictions summed over ranks, one record per (model,
experiment) with its paired statistics against the baseline, the claims, and the files of ``--out``.

Nothing is written unless every configuration's predictions hold exactly the images its counts hold
(``_check_backed``): a prediction file lost or damaged during the run stops it with one line, the result
files of an earlier finish left as they were, and a rerun recomputes what is missing. A disk fault while
the files are written is one line (``progress.disk_faults``); a rerun writes them all again."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

from ..flops import flops
from .claims import claims, claims_text
from .errors import NoImagesError, RunError
from .experiment import BASELINE, Experiment
from .figures import plot_accuracy_vs_flops, plot_hsp_deviation, weights_text
from .paired_stats import agreement, cluster_bootstrap, image_differences
from .predictions import correct, filled
from .progress import disk_faults, write_json
from .regime import regime_table
from .report import write_outputs

__all__ = ["finish"]


def _gather(progress, keys, rank, world):
    counts = {k: dict(progress.counts.get(k, {"top1": 0, "top5": 0, "images": 0, "seconds": 0.0})) for k in keys}
    bad = [m for msgs in progress.bad.values() for m in msgs]
    if world > 1:
        t = torch.tensor([[counts[k]["top1"], counts[k]["top5"], counts[k]["images"], counts[k]["seconds"]] for k in keys],
                         dtype=torch.float64)
        torch.distributed.all_reduce(t)
        depth = max((len(c.get("deviation_sums") or []) for c in counts.values()), default=0)
        dev = torch.tensor([counts[k].get("deviation_sums") or [0.0] * depth for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(dev)
        for k, row, sums in zip(keys, t.tolist(), dev.tolist()):
            counts[k] = {"top1": int(row[0]), "top5": int(row[1]), "images": int(row[2]), "seconds": row[3] / world,
                         "deviation_sums": sums if depth else None}
        lists = [None] * world
        torch.distributed.all_gather_object(lists, bad)
        bad = [m for part in lists for m in part]
    return counts, sorted(bad)


def _pooled_difference(names, a, b, labels, preds):
    """The difference of top-1 of experiment a to b pooled over the models, with its cluster-bootstrap 95%
    interval (descriptive: the table's Δ column and the ablation panel)."""
    d = image_differences(correct(preds, labels, names, a)[0], correct(preds, labels, names, b)[0])
    low, high, _ = cluster_bootstrap(d) if d.size else (None, None, None)
    return {"diff": float(d.mean()) if d.size else None, "ci_low": low, "ci_high": high}


def _record(name, model, e, plan, count, bad, skipped, agree, vs_base, fine, ignored=0):
    """The result record of one (model, experiment); accuracy None when no image of the cell could be read."""
    n = count["images"]
    paper = flops(model.cfg, convention="paper", reduction=plan)
    kl, dev = fine
    sums = count.get("deviation_sums")
    return {"model": name, "method": e.method, "rate": e.rate, "schedule": e.schedule_value, "options": e.opts,
            "note": e.note, "label": e.label, "achieved_rate": plan.rate, "tokens_per_layer": list(plan.tokens_per_layer),
            "top1": 100.0 * count["top1"] / n if n else None, "top5": 100.0 * count["top5"] / n if n else None,
            "agreement": agree, "vs_baseline": vs_base,
            "kl_to_baseline": float(np.nanmean(kl)) if n else None,
            "cls_deviation": [v / n for v in sums] if sums and n else None,
            "images": n, "bad_images": len(bad), "skipped_files": len(skipped), "ignored_files": ignored,
            "num_classes": model.cfg.num_classes,
            "gflops_paper": paper["total"], "gflops_full": flops(model.cfg, convention="full", reduction=plan)["total"],
            "gflops_overhead": paper["overhead"],
            "images_per_s": n / count["seconds"] if count["seconds"] > 0 else None}


def _summaries(run, names, labels, preds):
    """(pooled vs-baseline stats by (label, point), STM ablations against the plain average)."""
    pooled = {(e.label, json.dumps(e.point)): _pooled_difference(names, e, BASELINE, labels, preds) for e in run.exps}
    ablations = []
    present = set(run.exps)
    for e in run.exps:
        avg = e.with_options(weights="avg")
        if e.method != "stm" or e == avg or avg not in present or not isinstance(e.point, float):
            continue
        ablations.append({"variant": e.label, "rate": e.point, **_pooled_difference(names, e, avg, labels, preds)})
    return pooled, ablations


def _check_backed(out, counts, labels, preds, fine):
    """RunError unless each configuration's predictions (top-1, KL and deviation) and the labels hold exactly the
    images its counts hold: a count without its predictions would be scored as wrong answers."""
    read = filled(labels)
    lost = [k for k, c in counts.items()
            if not filled(preds[k]) == filled(fine[k][0]) == filled(fine[k][1]) == read == c["images"]]
    if lost:
        raise RunError(f"the predictions of {len(lost)} configuration(s) in {out}/predictions do not hold the images "
                       f"counted (e.g. {lost[0]}; a file was deleted or damaged during the run): nothing was written; "
                       f"rerun with the same --out to recompute them")


# ImageNet-1k validation top-1 of the official checkpoints, as the paper reports them
ANCHORS = {"vim_tiny": 76.1, "vim_small": 80.5, "vim_base": 81.9}


def baseline_warnings(records, args) -> list[str]:
    """One warning line per unreduced model that scores near chance (twice chance or less, on 200 images or
    more), or, for an official checkpoint on 1,000 images or more, more than 5 points below the paper's anchor: a wrong
    checkpoint, labels or preprocessing make every comparison meaningless, so the run says so."""
    from ..registry import canonical_name

    out = []
    for r in records:
        if r["method"] != "none" or r["top1"] is None:
            continue
        chance = 100.0 / r["num_classes"]
        anchor = ANCHORS.get(canonical_name(args.model)) if args.checkpoint else None
        if r["images"] < 200:  # too few images to tell a broken model from bad luck
            continue
        if r["top1"] <= 2 * chance:
            out.append(f"warning: the unreduced {r['model']} scores {r['top1']:.1f}% top-1, near chance ({chance:.1f}%): "
                       f"a wrong checkpoint, label file or --override? Every comparison of this run is then meaningless")
        elif anchor is not None and r["images"] >= 1000 and r["top1"] < anchor - 5:
            out.append(f"warning: the unreduced {r['model']} scores {r['top1']:.1f}% top-1 where the paper reports "
                       f"{anchor}% on ImageNet-1k val: check --checkpoint (--ema?), the labels and the image folder")
    return out


def finish(run, skipped, weights=None):
    """Records, claims.json and the other files; the table, the claims and (``weights``: ``hsp_weights``'s
    summaries) the lsq weights' spread printed. None on ranks > 0."""
    keys = list(run.plans)
    counts, bad = _gather(run.progress, keys, run.rank, run.world)
    labels, preds, fine = run.store.gather(keys, run.world)
    if run.rank != 0:
        return None
    _check_backed(run.args.out, counts, labels, preds, fine)
    with disk_faults(run.args.out, f"the result files into {run.args.out}"):
        return _write(run, skipped, weights, counts, bad, labels, preds, fine)


def _write(run, skipped, weights, counts, bad, labels, preds, fine):
    """The records, claims and files of ``finish``."""
    valid = labels >= 0
    records = [{**_record(name, model, e, run.plans[e.key(name)], counts[e.key(name)], bad, skipped,
                          agreement(preds[e.key(name)], preds[BASELINE.key(name)], valid),
                          _pooled_difference([name], e, BASELINE, labels, preds), fine[e.key(name)], run.ignored),
                "self_check": run.self_check}
               for name, model in run.models for e in run.exps]
    names = [name for name, _ in run.models]
    achieved = {e: run.plans[e.key(names[0])].rate for e in run.exps}
    stm_options = {**run.args.stm_options, "sides": "both"} if run.args.paper else run.args.stm_options
    found = claims(names, run.exps, labels, preds, fine, stm_options, achieved, run.models[0][1].cfg.depth)
    write_json(os.path.join(run.args.out, "claims.json"), found, indent=1)
    pooled, ablations = _summaries(run, names, labels, preds)
    table = write_outputs(run.args.out, records, bad, skipped, pooled, [regime_table(records, stm_options, pooled)])
    data = run.data_name
    plot_accuracy_vs_flops(os.path.join(run.args.out, "accuracy_vs_flops.png"), records,
                           Experiment.of("stm", 0.0, None, run.args.stm_options).label, ablations,
                           f"{data}: {len(names)} model{'s' if len(names) != 1 else ''}, {records[0]['images']} images each")
    plot_hsp_deviation(os.path.join(run.args.out, "hsp_deviation.png"), records)
    for line in baseline_warnings(records, run.args):
        print(line, file=sys.stderr)
    if not run.args.quiet:
        print(table + "\n\n" + claims_text(found, len(names)) + ("\n" + weights_text(weights) if weights else ""))
    empty = [r for r in records if r["top1"] is None]
    if empty:
        raise NoImagesError(f"no image of {len(empty)} cell(s) could be read (accuracy n/a in {run.args.out}/table.md); "
                            f"see the bad_image_files in results.json")
    return records
