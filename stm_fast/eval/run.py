"""Run the experiment grid over the images, batch by batch, resumable and sharded over torch.distributed ranks."""

from __future__ import annotations

import math
import os
import time

import torch

from ..flops import flops
from ..reduction import METHODS, make_reduction, reduced
from ..runtime import autocast, check_device, flush_denormals, synchronize
from .errors import NoImagesError, RunError
from .grid import exp_key, experiments
from .imagenet import DataError, collate_skip_bad
from .fingerprint import run_fingerprint
from .inputs import load_dataset, load_models
from .progress import Progress, RunFolder, check_out_path
from .report import write_outputs

__all__ = ["evaluate", "RunError"]


def evaluate(args):
    """Evaluate every (model, experiment) on every image of the run described by ``args`` (``parse_args``);
    returns the result records on rank 0 (None on other ranks)."""
    with flush_denormals():  # see stm_fast.runtime.flush_denormals: several times faster on trained models
        return _evaluate(args)


def _env_int(name, default):
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise RunError(f"environment variable {name}={value!r} is not an integer (torchrun sets it; unset it to run "
                       f"as one process)") from None


def _world():
    """(WORLD_SIZE, RANK) from torchrun's environment, checked."""
    world, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise RunError(f"WORLD_SIZE={world} and RANK={rank} do not describe a process group (need 0 <= RANK < WORLD_SIZE)")
    return world, rank


def _dist(device, world):
    """(rank, world), the process group set up when world > 1. Each rank uses its own GPU (set as the
    current device before the group exists, as NCCL, object collectives and Triton launches require).
    The eval only exchanges a small table of counts and a list of file names, both on the CPU, so the
    group is gloo (``STM_DIST_BACKEND`` overrides, e.g. "cpu:gloo,cuda:nccl")."""
    if world == 1:
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=os.environ.get("STM_DIST_BACKEND") or "gloo")
    return torch.distributed.get_rank(), world


def _cli_spelling(e):
    """'stm (sides=left) at --rates 0.2': an experiment as the user asked for it (defaults left out)."""
    method, rate, sched, options = e
    defaults = METHODS[method].defaults if method in METHODS else {}
    extra = [f"{k}={v}" for k, v in options.items() if defaults.get(k, object()) != v]
    where = f"--schedule {sched}" if sched is not None else f"--rates {rate}"
    return f"{method}{' (' + ', '.join(extra) + ')' if extra else ''} at {where}"


def _plans(models, exps):
    """{key: Reduction} of every (model, experiment); an infeasible one is a RunError before any work."""
    plans = {}
    for name, model in models:
        for e in exps:
            method, rate, sched, options = e
            try:
                plans[exp_key(name, e)] = make_reduction(model, method, rate=None if sched is not None else rate,
                                                         schedule=sched, **options)
            except (ValueError, TypeError) as err:
                why = str(err).replace("pass schedule=[...]", "pass --schedule N,N,... (tokens after each layer)")
                raise RunError(f"{_cli_spelling(e)} cannot run on {name}: {why}. Drop that rate or method group "
                               f"(--rates / --methods) or change the STM options") from None
    return plans


def _device(args, world):
    """--device, checked; under torchrun a plain "cuda" means each rank's own GPU, cuda:LOCAL_RANK."""
    try:
        device = check_device(args.device)
        if device.type == "cuda" and world > 1 and device.index is None:
            device = check_device(f"cuda:{_env_int('LOCAL_RANK', 0)}")
    except ValueError as e:
        raise RunError(str(e)) from None
    return device


def _prepare(args, rank, world, device):
    """Everything checked and loaded before a file is written: (models, dataset, plans, folder, experiments)."""
    check_out_path(args.out)
    models = load_models(args, device)  # checkpoint and data errors surface here, before any output is written
    dataset = load_dataset(args, models[0][1].cfg)
    exps = experiments(args.methods, args.rates, args.schedule, args.stm_options)
    _plans(models, exps)  # every requested configuration can run
    fingerprint = run_fingerprint(args, dataset, device)
    folder = RunFolder(args.out)
    if rank == 0:
        folder.lock()
        if args.restart:
            folder.restart()
        exps = folder.open(fingerprint, world, exps)
    if world > 1:
        shared = [exps]
        torch.distributed.broadcast_object_list(shared, src=0)
        exps = [tuple(e) for e in shared[0]]
        os.makedirs(args.out, exist_ok=True)
    return models, dataset, _plans(models, exps), folder, exps


def _evaluate(args):
    world, _ = _world()
    device = _device(args, world)
    rank, world = _dist(device, world)
    models, dataset, plans, folder, exps = _prepare(args, rank, world, device)
    try:
        shard = list(range(rank, len(dataset), world))
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, shard), batch_size=args.batch_size,
                                             shuffle=False, num_workers=args.workers, collate_fn=collate_skip_bad)
        progress = Progress(os.path.join(args.out, f"progress.rank{rank}.json"))
        _run_batches(args, loader, math.ceil(len(shard) / args.batch_size), models, exps, plans, progress, device,
                     rank, world)
        return _finish(args, rank, world, models, exps, plans, progress, getattr(dataset, "skipped", []))
    finally:
        folder.release()


def _score(model, reduction, x, y, device, precision, where):
    """(top-1 hits, top-5 hits, seconds) of one configuration on one batch; non-finite logits stop the run."""
    t0 = time.perf_counter()
    with reduced(model, reduction), torch.inference_mode(), autocast(device, precision):
        logits = model(x)
    synchronize(device)
    seconds = time.perf_counter() - t0
    if not bool(torch.isfinite(logits).all()):
        raise RunError(f"non-finite logits (NaN or inf) in {where}: the numbers would mean nothing, so the run stops "
                       f"(finished batches are saved); check the checkpoint and --dtype (fp32 is the safest)")
    topk = logits.float().topk(min(5, logits.shape[1]), dim=1).indices.cpu()
    return int((topk[:, 0] == y).sum()), int((topk == y[:, None]).any(dim=1).sum()), seconds


def _warm_up(models, exps, plans, x, device, precision):
    """On CUDA, one untimed forward of every configuration on the first batch, so that lazy imports, Triton
    compilation (a new one for every sequence length a reduction creates) and cuBLAS set-up stay out of the
    timed forwards; a resumed run warms up again. On the CPU nothing is compiled per shape: no warm-up."""
    if device.type != "cuda":
        return True
    for name, model in models:
        for e in exps:
            with reduced(model, plans[exp_key(name, e)]), torch.inference_mode(), autocast(device, precision):
                model(x)
    synchronize(device)
    return True


def _run_batches(args, loader, n_batches, models, exps, plans, progress, device, rank, world):
    """Every batch through every unfinished configuration; progress saved after each batch."""
    from tqdm import tqdm

    keys = list(plans)
    start = min((progress.done(k) for k in keys), default=n_batches)
    bar = tqdm(total=n_batches * len(keys), initial=sum(min(progress.done(k), n_batches) for k in keys),
               desc=f"eval (rank {rank})" if world > 1 else "eval", unit="cfg-batch", disable=args.quiet or rank != 0)
    images_seen, warm = 0, False
    for b, (x, y, _, bad) in enumerate(loader):
        if b < start:
            continue  # DataLoader still decodes skipped batches: resume skips the model work, the only costly part
        if bad:
            if args.on_bad_image == "error":
                raise DataError("unreadable image(s): " + "; ".join(bad[:5]) + " (use --on-bad-image skip to exclude them)")
            progress.bad[str(b)] = bad
        xd = None if x is None else x.to(device, non_blocking=True)  # once per batch, for every configuration
        if xd is not None and not warm:
            warm = _warm_up(models, exps, plans, xd, device, args.dtype)
        for name, model in models:
            for e in exps:
                key = exp_key(name, e)
                if key not in plans or progress.done(key) > b:
                    continue
                where = f"batch {b} of {name}, {_cli_spelling(e)}"
                top1, top5, seconds = (0, 0, 0.0) if x is None else _score(model, plans[key], xd, y, device, args.dtype,
                                                                           where)
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


def _record(name, model, e, plan, count, bad, skipped):
    """The result record of one (model, experiment); accuracy None when no image of the cell could be read."""
    method, rate, sched, options = e
    n = count["images"]
    paper = flops(model.cfg, convention="paper", reduction=plan)
    return {"model": name, "method": method, "rate": rate, "schedule": sched, "options": options,
            "achieved_rate": plan.rate, "tokens_per_layer": list(plan.tokens_per_layer),
            "top1": 100.0 * count["top1"] / n if n else None, "top5": 100.0 * count["top5"] / n if n else None,
            "images": n, "bad_images": len(bad), "skipped_files": len(skipped),
            "gflops_paper": paper["total"], "gflops_full": flops(model.cfg, convention="full", reduction=plan)["total"],
            "gflops_overhead": paper["overhead"],
            "images_per_s": n / count["seconds"] if count["seconds"] > 0 else None}


def _finish(args, rank, world, models, exps, plans, progress, skipped):
    counts, bad = _gather(progress, list(plans), rank, world)
    if rank != 0:
        return None
    records = [_record(name, model, e, plans[exp_key(name, e)], counts[exp_key(name, e)], bad, skipped)
               for name, model in models for e in exps]
    table = write_outputs(args.out, records, bad, skipped)
    if not args.quiet:
        print(table)
        print(f"\nresults: {os.path.join(args.out, 'results.json')} (+ results.csv, table.md, accuracy_vs_flops.png)")
    empty = [r for r in records if r["top1"] is None]
    if empty:
        raise NoImagesError(f"no image of {len(empty)} cell(s) could be read (accuracy n/a in {args.out}/table.md); "
                            f"see the bad_image_files in results.json")
    return records
