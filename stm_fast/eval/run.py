"""Run the experiment grid over the images, batch by batch, resumable and sharded over torch.distributed ranks."""

from __future__ import annotations

import math
import os
import time

import torch

from ..flops import flops
from ..reduction import make_reduction, reduced
from ..runtime import autocast, flush_denormals, pick_device, synchronize
from .errors import RunError
from .grid import exp_key, experiments
from .imagenet import DataError, collate_skip_bad
from .inputs import load_dataset, load_models, run_settings
from .progress import Progress, check_run_folder, write_run_file
from .report import write_outputs

__all__ = ["evaluate", "RunError"]


def evaluate(args):
    """Evaluate every (model, experiment) on every image of the run described by ``args`` (``parse_args``);
    returns the result records on rank 0 (None on other ranks)."""
    with flush_denormals():  # see stm_fast.runtime.flush_denormals: several times faster on trained models
        return _evaluate(args)


def _dist():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("STM_DIST_BACKEND", "") != "gloo" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    if world > 1:
        return torch.distributed.get_rank(), world
    return 0, 1


def _plans(models, exps):
    """{key: Reduction} of every feasible (model, experiment) and {key: message} of the others."""
    plans, errors = {}, {}
    for name, model in models:
        for e in exps:
            method, rate, sched, options = e
            try:
                plans[exp_key(name, e)] = make_reduction(model, method, rate=None if sched is not None else rate,
                                                         schedule=sched, **options)
            except (ValueError, TypeError) as err:
                errors[exp_key(name, e)] = str(err)
    return plans, errors


def _evaluate(args):
    rank, world = _dist()
    device = pick_device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    settings = run_settings(args)
    check_run_folder(args.out, settings, world)
    models = load_models(args, device)  # checkpoint and data errors surface here, before any output is written
    dataset = load_dataset(args, models[0][1].cfg.img_size)
    if rank == 0:
        write_run_file(args.out, settings, world)
    else:
        os.makedirs(args.out, exist_ok=True)
    exps = experiments(args.methods, args.rates, args.schedule, args.stm_options)
    plans, errors = _plans(models, exps)
    shard = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, shard), batch_size=args.batch_size,
                                         shuffle=False, num_workers=args.workers, collate_fn=collate_skip_bad)
    progress = Progress(os.path.join(args.out, f"progress.rank{rank}.json"))
    _run_batches(args, loader, math.ceil(len(shard) / args.batch_size), models, exps, plans, progress, device, rank, world)
    return _finish(args, rank, world, models, exps, plans, errors, progress)


def _score(model, reduction, x, y, device, precision):
    """(top-1 hits, top-5 hits, seconds) of one configuration on one batch."""
    t0 = time.perf_counter()
    with reduced(model, reduction), torch.inference_mode(), autocast(device, precision):
        logits = model(x)
    synchronize(device)
    seconds = time.perf_counter() - t0
    topk = logits.float().topk(min(5, logits.shape[1]), dim=1).indices.cpu()
    return int((topk[:, 0] == y).sum()), int((topk == y[:, None]).any(dim=1).sum()), seconds


def _run_batches(args, loader, n_batches, models, exps, plans, progress, device, rank, world):
    """Every batch through every unfinished configuration; progress saved after each batch."""
    from tqdm import tqdm

    keys = list(plans)
    start = min((progress.done(k) for k in keys), default=n_batches)
    bar = tqdm(total=n_batches * len(keys), initial=sum(min(progress.done(k), n_batches) for k in keys),
               desc=f"eval (rank {rank})" if world > 1 else "eval", unit="cfg-batch", disable=args.quiet or rank != 0)
    images_seen = 0
    for b, (x, y, _, bad) in enumerate(loader):
        if b < start:
            continue  # DataLoader still decodes skipped batches: resume skips the model work, the only costly part
        if bad:
            if args.on_bad_image == "error":
                raise DataError("unreadable image(s): " + "; ".join(bad[:5]) + " (use --on-bad-image skip to exclude them)")
            progress.bad[str(b)] = bad
        xd = None if x is None else x.to(device, non_blocking=True)  # once per batch, for every configuration
        for name, model in models:
            for e in exps:
                key = exp_key(name, e)
                if key not in plans or progress.done(key) > b:
                    continue
                top1, top5, seconds = (0, 0, 0.0) if x is None else _score(model, plans[key], xd, y, device, args.dtype)
                progress.add(key, b, top1, top5, 0 if x is None else len(y), seconds)
                images_seen += 0 if x is None else len(y)
                bar.update(1)
        progress.save()
        if bar.format_dict.get("elapsed"):  # images through the model per second, over all configurations
            bar.set_postfix(img_per_s=f"{images_seen / max(bar.format_dict['elapsed'], 1e-9):.0f}")
    bar.close()


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


def _record(name, model, e, plan, count, bad):
    """The result record of one (model, experiment)."""
    method, rate, sched, options = e
    rec = {"model": name, "method": method, "rate": rate, "schedule": sched, "options": options, "images": 0,
           "bad_images": len(bad)}
    if plan is None:
        return rec
    n = max(count["images"], 1)
    paper = flops(model.cfg, convention="paper", reduction=plan)
    rec.update(achieved_rate=plan.rate, tokens_per_layer=list(plan.tokens_per_layer),
               top1=100.0 * count["top1"] / n, top5=100.0 * count["top5"] / n, images=count["images"],
               gflops_paper=paper["total"], gflops_full=flops(model.cfg, convention="full", reduction=plan)["total"],
               gflops_overhead=paper["overhead"],
               images_per_s=count["images"] / count["seconds"] if count["seconds"] > 0 else None)
    return rec


def _finish(args, rank, world, models, exps, plans, errors, progress):
    counts, bad = _gather(progress, list(plans), rank, world)
    if rank != 0:
        return None
    records = []
    for name, model in models:
        for e in exps:
            key = exp_key(name, e)
            rec = _record(name, model, e, plans.get(key), counts.get(key), bad)
            if key in errors:
                rec.update(error=errors[key], achieved_rate=None, top1=None, top5=None, gflops_paper=None,
                           gflops_full=None, images_per_s=None)
            records.append(rec)
    table = write_outputs(args.out, records, bad)
    if not args.quiet:
        print(table)
        print(f"\nresults: {os.path.join(args.out, 'results.json')} (+ results.csv, table.md, accuracy_vs_flops.png)")
    return records
