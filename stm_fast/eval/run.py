"""Run the experiment grid over the images, batch by batch, resumable and sharded over torch.distributed ranks."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from ..reduction import METHODS, make_reduction, reduced
from ..runtime import autocast, check_device, flush_denormals, synchronize
from ..checkpoint import CheckpointError
from .errors import NoImagesError, RankExit, RunError
from .experiment import BASELINE, Experiment
from .grid import experiments
from .paper import TABLE2_SCHEDULE, paper_experiments
from .imagenet import DataError, collate_skip_bad, ignored_note
from .fingerprint import run_fingerprint
from ..selfcheck import SelfCheckFailed, describe_check, self_check
from .inputs import data_name, first_images, load_dataset, load_models
from .predictions import PredictionStore
from .preflight import check_scan_backend, distributed_env, join_group, local_rank
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
        except BaseException as e:
            # after an error every rank agreed on (_agree), all of them stand at the same point: close the group
            # together (a rank that leaves first can abort the other's gloo threads, "terminate called ...");
            # after any other error the other ranks may be anywhere, and waiting for them could hang
            _close_group(wait=getattr(e, "agreed", False))
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


def _dist(device, world):
    """(rank, world), the process group set up when world > 1 (``preflight.join_group``: the rendezvous waits
    at most STM_DIST_TIMEOUT seconds). Each rank uses its own GPU (set as the current device before the group
    exists, as NCCL, object collectives and Triton launches require). The eval only exchanges small tables,
    statuses and file names, all on the CPU, so the group is gloo (``STM_DIST_BACKEND`` overrides, e.g.
    "cpu:gloo,cuda:nccl"). ``device`` is None when this rank refused its --device (the ranks then agree to stop)."""
    if world == 1:
        return 0, 1
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        join_group(world, os.environ.get("STM_DIST_BACKEND") or "gloo")
    return torch.distributed.get_rank(), world


def _attempt(out, fn, *args):
    """(fn(*args), None), or (None, the exception): a rank's failure is shared with the others (``_agree``)
    instead of leaving them waiting in a collective it never reaches. A full disk is a refusal here already
    (``disk_faults``), so that rank 0 can report it for any rank."""
    try:
        with disk_faults(out):
            return fn(*args), None
    except Exception as e:  # noqa: BLE001 - every failure is shared, then re-raised by _agree
        return None, e


def _exit_code(err):
    """What ``cli.main`` exits with for ``err``: 3 for a cell without images, 2 for a refusal, 1 for a bug."""
    if isinstance(err, NoImagesError):
        return 3
    return 2 if isinstance(err, (RunError, DataError, CheckpointError, FileNotFoundError)) else 1


def _agree(world, rank, err, payload=None):
    """Called by every rank at the same point with its own error (or None): rank 0's ``payload`` when no rank
    failed. Otherwise rank 0 raises its own error, or the first failing rank's as one line naming that rank,
    and every other rank exits with rank 0's code, silently (an unexpected error keeps its traceback)."""
    if world == 1:
        if err is not None:
            raise err
        return payload
    mine = None if err is None else (_exit_code(err), (str(err).strip().splitlines() or [type(err).__name__])[0])
    shared = [None] * world
    torch.distributed.all_gather_object(shared, (mine, payload if rank == 0 else None))
    failed = [(r, status) for r, (status, _) in enumerate(shared) if status is not None]
    if not failed:
        return shared[0][1]
    if err is not None and (rank == 0 or _exit_code(err) == 1):
        raise _agreed(err)
    first, (code, message) = failed[0]
    if rank != 0:
        raise _agreed(RankExit(shared[0][0][0] if shared[0][0] is not None else 3 if code == 3 else 2))
    raise _agreed((NoImagesError if code == 3 else RunError)(f"rank {first}: {message}"))


def _agreed(err):
    """``err``, marked as raised on every rank at the same point (``evaluate`` then closes the group together)."""
    err.agreed = True
    return err


def _stop(world, err):
    """Whether some rank failed; every rank asks once per round of batches, so a failure stops them all
    within a batch."""
    if world == 1:
        return err is not None
    flag = torch.tensor([int(err is not None)])
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


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
            device = check_device(f"cuda:{local_rank()}")
    except ValueError as e:
        raise RunError(str(e)) from None
    return device


def _checked_device(args, world):
    """The run's device, and a forced STM_SCAN_BACKEND that can run there: refused before anything loads."""
    device = _device(args, world)
    check_scan_backend(device)
    return device


def _experiments(args, models, rank):
    """The run's grid (--methods x --rates or --schedule, or a testbed's own), or the paper's settings with
    --paper; controls that cannot run on these models are left out with one line each."""
    cfg = models[0][1].cfg
    if not args.paper:
        exps, notes = experiments(args.grid, args.stm_options, cfg)
    else:
        both = {**args.stm_options, "sides": "both"}
        stm_rate = make_reduction(models[0][1], "stm", schedule=TABLE2_SCHEDULE, **both).rate
        peers = [g for g in args.methods if g in METHODS and g != "stm"]
        exps, notes = paper_experiments(args.paper_model, args.paper, args.stm_options, peers, stm_rate), []
    if rank == 0 and not args.quiet:
        for line in notes:
            print(f"note: {line}")
    return exps


def _load(args, rank, device):
    """(models, dataset, experiments, fingerprint, the self-check's record): everything checked and loaded
    before a file is written."""
    check_out_path(args.out)
    models = load_models(args, device)  # checkpoint and data errors surface here, before any output is written
    dataset = load_dataset(args, models[0][1].cfg)
    note = ignored_note(dataset)
    if note and rank == 0 and not args.quiet:
        print(note)
    exps = _experiments(args, models, rank)
    _plans(models, exps)  # every requested configuration can run
    fingerprint = run_fingerprint(args, dataset, device)
    return models, dataset, exps, fingerprint, _self_check(args, models, dataset, device, rank)


def _open_folder(folder, args, rank, world, fingerprint, exps, check):
    """On rank 0: the folder locked, and the run's experiments (those it already holds first)."""
    if rank != 0:
        return None
    folder.lock()
    if args.restart:
        folder.restart()
    return folder.open(fingerprint, world, exps, check)


def _prepare(args, rank, world, device):
    """(models, dataset, plans, folder, experiments, the self-check's record): every rank checks and loads,
    then rank 0 opens the folder; the ranks agree after each step, so one rank's refusal stops them all."""
    loaded, err = _attempt(args.out, _load, args, rank, device)
    _agree(world, rank, err)
    models, dataset, exps, fingerprint, check = loaded
    folder = RunFolder(args.out)
    opened, err = _attempt(args.out, _open_folder, folder, args, rank, world, fingerprint, exps, check)
    try:
        exps = list(_agree(world, rank, err, opened))
    except BaseException:
        folder.release()
        raise
    if world > 1:
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
    ignored: int = 0  # files of --data that are not read (imagenet.ignored_note)
    warm: bool = False  # whether the warm-up forwards have run


def _start(args, prepared, rank, world, device):
    """(the run, this rank's loader): every WORLD_SIZE-th image from ``rank`` on."""
    models, dataset, plans, _, exps, check = prepared
    shard = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, shard), batch_size=args.batch_size,
                                         shuffle=False, num_workers=args.workers, collate_fn=collate_skip_bad,
                                         pin_memory=device.type == "cuda")
    progress = Progress(os.path.join(args.out, f"progress.rank{rank}.json"))
    progress.expect(list(plans), len(models[0][1].layers))
    return _Run(args, models, exps, plans, device, rank, world, progress, PredictionStore(args.out, rank, len(shard)),
                check, data_name(args), len(getattr(dataset, "ignored", []))), loader


def _finish(run, dataset, weights):
    records = finish(run, getattr(dataset, "skipped", []), weights)
    if run.args.figures and run.rank == 0:
        write_paper_figures(run, dataset)
    return records


def _evaluate(args):
    """The run; every rank takes part in the same collectives in the same order, whatever its images."""
    world, rank = distributed_env()  # a bad launch is refused before anything waits
    device, err = _attempt(args.out, _checked_device, args, world)
    rank, world = _dist(device, world)
    _agree(world, rank, err)
    prepared = _prepare(args, rank, world, device)
    try:
        started, err = _attempt(args.out, _start, args, prepared, rank, world, device)
        _agree(world, rank, err)
        (run, loader), dataset = started, prepared[1]
        rounds = math.ceil(math.ceil(len(dataset) / world) / args.batch_size)  # rank 0's shard is the largest
        err = _run_batches(run, loader, rounds)
        weights = {}
        if err is None and rank == 0:
            weights, err = _attempt(args.out, hsp_weights, run, dataset)
        _agree(world, rank, err)
        records, err = _attempt(args.out, _finish, run, dataset, weights)
        _agree(world, rank, err)
        return records
    finally:
        prepared[3].release()


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


def _model_batch(run, b, name, model, xd, y, positions, tick):
    """Batch b of one model through every configuration that has not done it, the baseline first (its logits
    and class states are what the finer measures compare with; recomputed when only others remain)."""
    todo = [e for e in run.exps if run.progress.done(e.key(name)) <= b]
    if not todo:
        return 0
    if xd is None:  # a batch without readable images: counted, nothing scored
        for e in todo:
            run.progress.add(e.key(name), b, 0, 0, 0, 0.0)
        tick(len(todo))
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
        tick(1)  # the bar moves with every configuration, not only with every batch
    return len(todo)


def _batch(run, b, x, y, idx, tick=lambda n: None):
    """Batch b through every configuration that has not done it (``tick(n)`` after each); returns the forwards run."""
    xd = None if x is None else x.to(run.device, non_blocking=True)  # once per batch, for every configuration
    positions = ((idx - run.rank) // run.world).numpy()  # the images' places in this rank's shard
    if x is not None:
        run.store.record_labels(positions, y.numpy())
    done = sum(_model_batch(run, b, name, model, xd, y, positions, tick) for name, model in run.models)
    run.store.flush()  # the predictions are on disk before the progress file counts the batch
    run.progress.save()
    return done


def _step(run, b, batches, start, bar):
    """Batch b of this rank's shard (decoded, then skipped when a resumed run has done it)."""
    x, y, idx, bad, digests = next(batches)
    run.store.check_images(digests, run.world)  # every batch, skipped ones too: a changed image is refused
    if b < start:
        return  # DataLoader still decodes skipped batches: resume skips the model work, the only costly part
    if bad:
        if run.args.on_bad_image == "error":
            raise DataError("unreadable image(s): " + "; ".join(bad[:5]) + " (use --on-bad-image skip to exclude them)")
        run.progress.bad[str(b)] = bad
    if x is not None and not run.warm:
        run.warm = _warm_up(run, x.to(run.device))
    _batch(run, b, x, y, idx, bar.update)


def _run_batches(run, loader, rounds):
    """Every batch through every unfinished configuration, progress saved after each. All ranks go through
    the same ``rounds`` (a rank with fewer or no batches idles) and learn after each whether one failed.
    Returns this rank's error, or None."""
    from tqdm import tqdm

    keys, args, n_batches = list(run.plans), run.args, len(loader)
    start = min((run.progress.done(k) for k in keys), default=n_batches)
    bar = tqdm(total=n_batches * len(keys), initial=sum(min(run.progress.done(k), n_batches) for k in keys),
               desc=f"eval (rank {run.rank})" if run.world > 1 else "eval", unit="cfg-batch",
               disable=args.quiet or run.rank != 0)
    batches, err = iter(loader), None
    for b in range(rounds):
        if err is None and b < n_batches:
            _, err = _attempt(args.out, _step, run, b, batches, start, bar)
        if _stop(run.world, err):
            break
    bar.close()
    return err
