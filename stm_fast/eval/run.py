"""Run the experiment grid over the images, batch by batch, resumable and sharded over torch.distributed ranks."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from ..reduction import METHODS, make_reduction, reduced
from ..runtime import autocast, check_device, flush_denormals, synchronize
from .errors import RunError
from .experiment import BASELINE, Experiment
from .grid import experiments
from .paper import paper_experiments, table2_schedule
from .imagenet import DataError, collate_skip_bad
from .fingerprint import run_fingerprint
from ..selfcheck import SelfCheckFailed, describe_check, self_check
from .inputs import data_name, first_images, load_dataset, load_models
from .predictions import PredictionStore
from .progress import Progress, RunFolder, check_out_path, disk_faults
from .figures import hsp_weights, write_paper_figures
from .results import finish

__all__ = ["evaluate", "RunError"]


def evaluate(args):
    """Evaluate every (model, experiment) on every image of the run described by ``args`` (``parse_args``);
    returns the result records on rank 0 (None on other ranks)."""
    with flush_denormals():  # see stm_fast.runtime.flush_denormals: several times faster on trained models
        try:
            with disk_faults(args.out):  # a full disk or a file-size limit is one line, wherever it strikes
                records = _evaluate(args)
        except BaseException:
            _close_group(wait=False)  # the other ranks may be anywhere: waiting for them could hang
            raise
    _close_group(wait=True)
    return records


def _close_group(wait):
    """Destroy the process group, on success after every rank has finished: a rank that exits with the
    group's threads still running aborts ("terminate called without an active exception") and torchrun
    then kills the others, rank 0 among them while it writes the results."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            if wait:
                torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()


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


def _plans(models, exps):
    """{key: Reduction} of every (model, experiment); an infeasible one is a RunError before any work."""
    plans = {}
    for name, model in models:
        for e in exps:
            try:
                plans[e.key(name)] = make_reduction(model, e.method, rate=None if e.schedule is not None else e.rate,
                                                    schedule=e.schedule_value, **e.opts)
            except (ValueError, TypeError) as err:
                why = str(err).replace("pass schedule=[...]", "pass --schedule N,N,... (tokens after each layer)")
                raise RunError(f"{e.cli} cannot run on {name}: {why}. Drop that rate or method group "
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


def _experiments(args, models, rank):
    """The grid of --methods x --rates (or --schedule), or the paper's settings with --paper; controls that
    cannot run on these models are left out with one line each."""
    cfg = models[0][1].cfg
    if not args.paper:
        exps, notes = experiments(args.methods, args.rates, args.schedule, args.stm_options, cfg)
    else:
        both = {**args.stm_options, "sides": "both"}
        stm_rate = make_reduction(models[0][1], "stm", schedule=table2_schedule(args.paper_model), **both).rate
        peers = [g for g in args.methods if g in METHODS and g != "stm"]
        exps, notes = paper_experiments(args.paper_model, args.paper, args.stm_options, peers, stm_rate), []
    if rank == 0 and not args.quiet:
        for line in notes:
            print(f"note: {line}")
    return exps


def _prepare(args, rank, world, device):
    """Everything checked and loaded before a file is written: (models, dataset, plans, folder, experiments,
    the self-check's record)."""
    check_out_path(args.out)
    models = load_models(args, device)  # checkpoint and data errors surface here, before any output is written
    dataset = load_dataset(args, models[0][1].cfg)
    exps = _experiments(args, models, rank)
    _plans(models, exps)  # every requested configuration can run
    fingerprint = run_fingerprint(args, dataset, device)
    check = _self_check(args, models, dataset, device, rank)
    folder = RunFolder(args.out)
    if rank == 0:
        folder.lock()
        if args.restart:
            folder.restart()
        exps = folder.open(fingerprint, world, exps, check)
    if world > 1:
        shared = [exps]
        torch.distributed.broadcast_object_list(shared, src=0)
        exps = list(shared[0])
        os.makedirs(args.out, exist_ok=True)
    return models, dataset, _plans(models, exps), folder, exps, check


def _self_check(args, models, dataset, device, rank):
    """The run's self-check (stm_fast.selfcheck) on up to 4 images of the first model, before any work."""
    if args.no_self_check:
        return None
    x = first_images(dataset, 4)
    if x is None:
        return None
    try:
        record = self_check(models[0][1], x, device, precision=args.dtype)
    except SelfCheckFailed as e:
        raise RunError(str(e)) from None
    if rank == 0 and not args.quiet:
        print(describe_check(record))
    return record


@dataclass
class _Run:
    """What the batch loop works with."""

    args: object
    models: list
    exps: list
    plans: dict
    device: torch.device
    rank: int
    world: int
    progress: Progress = None
    store: PredictionStore = None
    self_check: dict | None = None  # the self-check's record (stm_fast.selfcheck), in run.json and every record
    data_name: str = ""  # the images, in words, for the figures' titles


def _evaluate(args):
    world, _ = _world()
    device = _device(args, world)
    rank, world = _dist(device, world)
    models, dataset, plans, folder, exps, check = _prepare(args, rank, world, device)
    try:
        shard = list(range(rank, len(dataset), world))
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, shard), batch_size=args.batch_size,
                                             shuffle=False, num_workers=args.workers, collate_fn=collate_skip_bad,
                                             pin_memory=device.type == "cuda")
        run = _Run(args, models, exps, plans, device, rank, world,
                   Progress(os.path.join(args.out, f"progress.rank{rank}.json")), PredictionStore(args.out, rank, len(shard)),
                   check, data_name(args))
        _run_batches(run, loader, math.ceil(len(shard) / args.batch_size))
        weights = hsp_weights(run, dataset) if rank == 0 else {}
        records = finish(run, getattr(dataset, "skipped", []), weights)
        if args.figures and rank == 0:
            write_paper_figures(run, dataset)
        return records
    finally:
        folder.release()


def _score(model, reduction, x, device, precision, where):
    """(logits (batch, classes) float32, the class token's entry after each layer (batch, depth, d),
    seconds) of one configuration on one batch; non-finite logits stop the run."""
    states = []
    t0 = time.perf_counter()
    with reduced(model, reduction), torch.inference_mode(), autocast(device, precision):
        logits = model(x, observer=lambda i, c: states.append(c.to(torch.float32, copy=True)))  # c may be a view
    synchronize(device)
    seconds = time.perf_counter() - t0
    if not bool(torch.isfinite(logits).all()):
        raise RunError(f"non-finite logits (NaN or inf) in {where}: the numbers would mean nothing, so the run stops "
                       f"(finished batches are saved); check the checkpoint and --dtype (fp32 is the safest)")
    return logits.float(), torch.stack(states, dim=1), seconds


def _against_baseline(logits, states, base):
    """Per image: KL(baseline || this) of the softmax predictions, and the class token's relative deviation
    from the baseline's after every layer (batch, depth); float64 on the CPU."""
    base_logits, base_states = base
    logp, logq = (torch.log_softmax(t.double(), dim=1) for t in (base_logits, logits))
    kl = (logp.exp() * (logp - logq)).sum(1)
    dev = (states.double() - base_states.double()).norm(dim=-1) / base_states.double().norm(dim=-1).clamp_min(1e-12)
    return kl.cpu().numpy(), dev.cpu()


def _warm_up(run, x):
    """On CUDA, one untimed forward of every configuration on the first batch, so that lazy imports, Triton
    compilation (a new one for every sequence length a reduction creates) and cuBLAS set-up stay out of the
    timed forwards; a resumed run warms up again. On the CPU nothing is compiled per shape: no warm-up."""
    if run.device.type != "cuda":
        return True
    for name, model in run.models:
        for e in run.exps:
            with reduced(model, run.plans[e.key(name)]), torch.inference_mode(), autocast(run.device, run.args.dtype):
                model(x)
    synchronize(run.device)
    return True


def _model_batch(run, b, name, model, xd, y, positions):
    """Batch b of one model through every configuration that has not done it, the baseline first (its logits
    and class states are what the finer measures compare with; recomputed when only others remain)."""
    todo = [e for e in run.exps if run.progress.done(e.key(name)) <= b]
    if not todo:
        return 0
    if xd is None:  # a batch without readable images: counted, nothing scored
        for e in todo:
            run.progress.add(e.key(name), b, 0, 0, 0, 0.0)
        return len(todo)
    base = _score(model, run.plans[BASELINE.key(name)], xd, run.device, run.args.dtype, f"batch {b} of {name}, baseline")
    for e in todo:
        key = e.key(name)
        logits, states, seconds = base if e == BASELINE else _score(
            model, run.plans[key], xd, run.device, run.args.dtype, f"batch {b} of {name}, {e.cli}")
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
        kl, dev = _against_baseline(logits, states, base[:2])
        run.store.record(key, positions, topk[:, 0].numpy(), kl, dev[:, -1].numpy())
        run.progress.add(key, b, int((topk[:, 0] == y).sum()), int((topk == y[:, None]).any(dim=1).sum()), len(y),
                         seconds, dev.sum(0).tolist())
    return len(todo)


def _batch(run, b, x, y, idx):
    """Batch b through every configuration that has not done it; returns the forwards run."""
    xd = None if x is None else x.to(run.device, non_blocking=True)  # once per batch, for every configuration
    positions = ((idx - run.rank) // run.world).numpy()  # the images' places in this rank's shard
    if x is not None:
        run.store.record_labels(positions, y.numpy())
    done = sum(_model_batch(run, b, name, model, xd, y, positions) for name, model in run.models)
    run.store.flush()  # the predictions are on disk before the progress file counts the batch
    run.progress.save()
    return done


def _run_batches(run, loader, n_batches):
    """Every batch through every unfinished configuration; progress saved after each batch."""
    from tqdm import tqdm

    keys, args = list(run.plans), run.args
    start = min((run.progress.done(k) for k in keys), default=n_batches)
    bar = tqdm(total=n_batches * len(keys), initial=sum(min(run.progress.done(k), n_batches) for k in keys),
               desc=f"eval (rank {run.rank})" if run.world > 1 else "eval", unit="cfg-batch",
               disable=args.quiet or run.rank != 0)
    warm = False
    for b, (x, y, idx, bad, digests) in enumerate(loader):
        run.store.check_images(digests, run.world)  # every batch, skipped ones too: a changed image is refused
        if b < start:
            continue  # DataLoader still decodes skipped batches: resume skips the model work, the only costly part
        if bad:
            if args.on_bad_image == "error":
                raise DataError("unreadable image(s): " + "; ".join(bad[:5]) + " (use --on-bad-image skip to exclude them)")
            run.progress.bad[str(b)] = bad
        if x is not None and not warm:
            warm = _warm_up(run, x.to(run.device))
        bar.update(_batch(run, b, x, y, idx))
    bar.close()
