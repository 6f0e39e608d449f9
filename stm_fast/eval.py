"""Accuracy tables for STM and its peers: ``python -m stm_fast.eval`` (the paper's Tables 2 and 3).

With no ``--data``/``--checkpoint`` it runs offline on the embedded default: three small Vision Mambas
shipped with the package, trained on scikit-learn's digits (``stm_fast.digits``), every cell reported as
the mean and min-max over the three. With ``--model --checkpoint --data`` it evaluates an official
hustvl/Vim checkpoint on ImageNet-1k validation images (``stm_fast.data`` lists the accepted layouts).

Every (model, method, rate, options) is evaluated on the same images. Work is saved after every batch
(``progress.rank<r>.json`` in ``--out``, written atomically); rerunning with the same ``--out`` resumes
and never recomputes finished work. Under ``torchrun`` each process takes every WORLD_SIZE-th image and
the counts are summed, so the numbers equal a single-process run.
Outputs in ``--out``: results.json, results.csv, table.md, accuracy_vs_flops.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

from . import digits
from .checkpoint import CheckpointError
from .data import DataError, ImageNetVal, collate_skip_bad, eval_transform
from .flops import flops
from .models import create_model, list_models, parse_overrides
from .reduce import reduce
from .scan import flush_denormals

DEFAULT_RATES = (0.15, 0.2, 0.3, 0.4)
STM_WEIGHT_VARIANTS = ("avg", "drop", "mean", "decay", "lsq_norm")
METHOD_GROUPS = ("stm", "stm-oneside", "stm-weights", "tome", "top", "evit")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class RunError(RuntimeError):
    """A problem with the run's settings or output folder; the message says what to do."""


# ----------------------------------------------------------------------------------------- experiments

def experiments(groups, rates, schedule, stm_options):
    """The list of (method, rate, schedule, options) to evaluate, baseline first."""
    out = [("none", 0.0, None, {})]
    points = [(None, schedule)] if schedule is not None else [(r, None) for r in rates]
    for g in groups:
        for rate, sched in points:
            if g == "stm":
                out.append(("stm", rate, sched, dict(stm_options)))
            elif g == "stm-oneside":
                out.append(("stm", rate, sched, {**stm_options, "sides": "left" if stm_options.get("sides", "both") != "right" else "right"}))
            elif g == "stm-weights":
                out += [("stm", rate, sched, {**stm_options, "weights": w}) for w in STM_WEIGHT_VARIANTS
                        if w != stm_options.get("weights", "lsq")]
            else:
                out.append((g, rate, sched, {}))
    seen, unique = set(), []
    for e in out:
        k = json.dumps(e, sort_keys=True)
        if k not in seen:
            seen.add(k)
            unique.append(e)
    return unique


def exp_key(model_name, exp):
    method, rate, sched, options = exp
    return json.dumps([model_name, method, rate, sched, options], sort_keys=True)


# -------------------------------------------------------------------------------------------- progress

def _atomic_write(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Progress:
    """Per-rank counts per experiment and per-batch bad-image reports, saved atomically after every batch."""

    def __init__(self, path):
        self.path = path
        self.counts = {}  # key -> {"batches", "top1", "top5", "images", "seconds"}
        self.bad = {}  # batch index -> [messages]
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            self.counts, self.bad = data["counts"], data["bad"]

    def done(self, key):
        return self.counts.get(key, {"batches": 0})["batches"]

    def add(self, key, batch_index, top1, top5, images, seconds):
        c = self.counts.setdefault(key, {"batches": 0, "top1": 0, "top5": 0, "images": 0, "seconds": 0.0})
        assert c["batches"] == batch_index
        c["batches"] += 1
        c["top1"] += top1
        c["top5"] += top5
        c["images"] += images
        c["seconds"] += seconds

    def save(self):
        _atomic_write(self.path, json.dumps({"counts": self.counts, "bad": self.bad}))


# ----------------------------------------------------------------------------------------------- setup

def _dist():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("STM_DIST_BACKEND", "") != "gloo" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    if world > 1:
        return torch.distributed.get_rank(), world
    return 0, 1


def _models(args, device):
    """[(name, model)] in eval mode on ``device``."""
    if args.checkpoint is None and args.data is None:
        return [(f"digits-seed{s}", digits.create_digits_model(p).to(device))
                for s, p in zip(digits.SEEDS, digits.shipped_checkpoints())]
    if args.checkpoint is None or args.data is None:
        raise RunError("a real run needs both --checkpoint and --data (with neither, the embedded digits default runs)")
    model = create_model(args.model, checkpoint_path=args.checkpoint, ema=args.ema, **args.overrides).to(device)
    return [(args.model, model)]


class _TensorData(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i]), i, None


def _dataset(args, img_size):
    if args.data is None:
        _, _, x, y = digits.load_split()
        if args.limit:
            x, y = x[: args.limit], y[: args.limit]
        return _TensorData(x, y)
    return ImageNetVal(args.data, labels=args.labels, devkit=args.devkit, limit=args.limit,
                       transform=eval_transform(img_size))


def _settings(args):
    return {"model": args.model if args.checkpoint else "digits", "checkpoint": os.path.abspath(args.checkpoint) if args.checkpoint else None,
            "data": os.path.abspath(args.data) if args.data else "sklearn-digits-test", "labels": args.labels,
            "limit": args.limit, "batch_size": args.batch_size, "dtype": args.dtype, "ema": args.ema,
            "overrides": args.overrides}


# ------------------------------------------------------------------------------------------------- run

def evaluate(args):
    with flush_denormals():  # see stm_fast.scan.flush_denormals: several times faster on trained models
        return _evaluate(args)


def _evaluate(args):
    rank, world = _dist()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    out = args.out
    settings = _settings(args)
    run_file = os.path.join(out, "run.json")
    if os.path.exists(run_file):
        with open(run_file) as f:
            old = json.load(f)
        if old.get("settings") != settings or old.get("world", 1) != world:
            raise RunError(f"--out {out} holds a run with other settings ({old.get('settings')}, {old.get('world', 1)} "
                           f"process(es)); resume with the same settings, or choose a new --out")
    models = _models(args, device)  # checkpoint and data errors surface here, before any output is written
    dataset = _dataset(args, models[0][1].cfg.img_size)
    os.makedirs(out, exist_ok=True)
    if rank == 0 and not os.path.exists(run_file):
        _atomic_write(run_file, json.dumps({"settings": settings, "world": world}, indent=1))
    exps = experiments(args.methods, args.rates, args.schedule, args.stm_options)
    plans, errors = {}, {}
    for name, model in models:
        for e in exps:
            method, rate, sched, options = e
            try:
                reduce(model, method, rate=None if sched is not None else rate, schedule=sched, **options)
                plans[exp_key(name, e)] = (model.reducer, model.reduction)
            except (ValueError, TypeError) as err:
                errors[exp_key(name, e)] = str(err)
        reduce(model, "none")

    shard = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, shard), batch_size=args.batch_size,
                                         shuffle=False, num_workers=args.workers, collate_fn=collate_skip_bad)
    progress = Progress(os.path.join(out, f"progress.rank{rank}.json"))
    keys = [k for k in plans]
    n_batches = math.ceil(len(shard) / args.batch_size)
    start = min((progress.done(k) for k in keys), default=n_batches)
    amp = _DTYPES[args.dtype]
    from tqdm import tqdm

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
                model.reducer, model.reduction = plans[key]
                top1 = top5 = 0
                t0 = time.perf_counter()
                if x is not None:
                    with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
                        logits = model(xd)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    seconds = time.perf_counter() - t0
                    topk = logits.float().topk(min(5, logits.shape[1]), dim=1).indices.cpu()
                    top1 = int((topk[:, 0] == y).sum())
                    top5 = int((topk == y[:, None]).any(dim=1).sum())
                else:
                    seconds = 0.0
                progress.add(key, b, top1, top5, 0 if x is None else len(y), seconds)
                images_seen += 0 if x is None else len(y)
                bar.update(1)
        progress.save()
        if bar.format_dict.get("elapsed"):  # images through the model per second, over all configurations
            bar.set_postfix(img_per_s=f"{images_seen / max(bar.format_dict['elapsed'], 1e-9):.0f}")
    bar.close()
    for _, model in models:
        reduce(model, "none")
    return _finish(args, rank, world, models, exps, plans, errors, progress, len(dataset))


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


def _finish(args, rank, world, models, exps, plans, errors, progress, n_images):
    keys = list(plans)
    counts, bad = _gather(progress, keys, rank, world)
    if rank != 0:
        return None
    records = []
    for name, model in models:
        img = model.cfg.img_size
        for e in exps:
            key = exp_key(name, e)
            method, rate, sched, options = e
            rec = {"model": name, "method": method, "rate": rate, "schedule": sched, "options": options,
                   "images": 0, "bad_images": len(bad)}
            if key in errors:
                rec.update(error=errors[key], achieved_rate=None, top1=None, top5=None, gflops_paper=None,
                           gflops_full=None, images_per_s=None)
            else:
                model.reducer, model.reduction = plans[key]
                c = counts[key]
                n = max(c["images"], 1)
                paper = flops(model, img, "paper")
                rec.update(achieved_rate=model.reduction["rate"], tokens_per_layer=model.reduction["tokens_per_layer"],
                           top1=100.0 * c["top1"] / n, top5=100.0 * c["top5"] / n, images=c["images"],
                           gflops_paper=paper["total"], gflops_full=flops(model, img, "full")["total"],
                           gflops_overhead=paper["overhead"],
                           images_per_s=c["images"] / c["seconds"] if c["seconds"] > 0 else None)
            records.append(rec)
        reduce(model, "none")
    from .report import write_outputs

    table = write_outputs(args.out, records, bad)
    if not args.quiet:
        print(table)
        print(f"\nresults: {os.path.join(args.out, 'results.json')} (+ results.csv, table.md, accuracy_vs_flops.png)")
    return records


# -------------------------------------------------------------------------------------------------- CLI

def _parser():
    ap = argparse.ArgumentParser(prog="python -m stm_fast.eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vim_tiny", choices=list_models(), metavar="NAME",
                    help="architecture of --checkpoint: vim_tiny, vim_small, vim_base or an official registry name")
    ap.add_argument("--checkpoint", help="official hustvl/Vim .pth (state dict under 'model'), or a bare state dict")
    ap.add_argument("--ema", action="store_true", help="load the checkpoint's 'model_ema' weights")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="architecture override for a custom checkpoint (img_size, patch_size, embed_dim, depth, d_state, "
                         "num_classes, channels); repeatable")
    ap.add_argument("--data", help="ImageNet val folder: ImageFolder layout, or flat with --labels")
    ap.add_argument("--labels", help="labels for a flat folder: a CSV, or the official ground-truth file (with --devkit)")
    ap.add_argument("--devkit", help="ILSVRC2012 devkit folder (or its data/meta.mat) for the official ground truth")
    ap.add_argument("--methods", nargs="+", default=list(METHOD_GROUPS), choices=METHOD_GROUPS,
                    help="method groups; stm-oneside = STM on one side only (Table 3); stm-weights = the HSP weight variants")
    ap.add_argument("--rates", nargs="+", type=float, default=list(DEFAULT_RATES), help="token reduction rates (0.2 = 20%%)")
    ap.add_argument("--schedule", help="instead of rates: tokens removed per side after each layer, comma-separated "
                                       "(one value = every layer), the paper's Table 3 setting, e.g. '2'")
    ap.add_argument("--stm-sides", default="both", choices=["both", "left", "right"])
    ap.add_argument("--stm-positions", default="ends", choices=["ends", "uniform"])
    ap.add_argument("--stm-weights", default="lsq", choices=["lsq", "mean", "decay", "lsq_norm", "avg", "drop"])
    ap.add_argument("--stm-start-layer", type=int, default=0)
    ap.add_argument("--limit", type=int, help="evaluate only the first N images")
    ap.add_argument("--batch-size", type=int, default=None, help="default 128 (360 for the embedded default)")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--dtype", default="fp32", choices=list(_DTYPES), help="autocast precision")
    ap.add_argument("--on-bad-image", default="skip", choices=["skip", "error"])
    ap.add_argument("--out", help="output folder (default: runs/<date-time>); reuse it to resume")
    ap.add_argument("--quiet", action="store_true")
    return ap


def parse_args(argv=None):
    args = _parser().parse_args(argv)
    for r in args.rates:
        if not 0 <= r < 1:
            raise RunError(f"--rates takes fractions in [0, 1) (0.2 means 20%), got {r}")
    if args.schedule:
        try:
            per_side = [int(v) for v in args.schedule.replace(" ", "").split(",") if v != ""]
        except ValueError:
            raise RunError(f"--schedule takes comma-separated integers, got {args.schedule!r}") from None
        both = args.stm_sides == "both"
        # per side per layer -> tokens removed per layer; one value means every layer
        args.schedule = (per_side[0] * (2 if both else 1)) if len(per_side) == 1 else [v * (2 if both else 1) for v in per_side]
    try:
        args.overrides = parse_overrides(args.override)
    except ValueError as e:
        raise RunError(str(e)) from None
    args.stm_options = {"sides": args.stm_sides, "positions": args.stm_positions, "weights": args.stm_weights,
                        "start_layer": args.stm_start_layer}
    if args.batch_size is None:
        args.batch_size = 128 if args.data else 360
    if args.out is None:
        args.out = os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return args


def main(argv=None):
    try:
        evaluate(parse_args(argv))
    except (CheckpointError, DataError, RunError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished batches are saved; rerun with the same --out to resume", file=sys.stderr)
        return 130
    finally:
        # shut the process group down here, not in interpreter teardown: a gloo group destroyed at exit
        # can abort the process ("terminate called without an active exception") after a good run
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
