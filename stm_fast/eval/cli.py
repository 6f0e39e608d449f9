"""The command line of ``python -m stm_fast.eval``: options, their checks, and the exit codes."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from dataclasses import dataclass, fields

from ..checkpoint import CheckpointError
from ..reduction.merge import TOKEN_WEIGHT_VARIANTS
from ..models import OVERRIDES, list_models, parse_overrides
from ..reduction import STM_DEFAULTS, check_rate, list_methods
from ..digits import TESTBEDS
from ..registry import ALIASES, MODEL_CONFIGS, canonical_name, describe
from ..runtime import AMP_DTYPES, HelpFormatter, non_negative_int, pick_device, positive_int
from .errors import NoImagesError, RunError
from .grid import DEFAULT_GROUPS, DEFAULT_RATES, METHOD_GROUPS, describe_grid, grid_groups
from .groups import GROUPS
from .imagenet import DataError
from .run import evaluate

__all__ = ["build_parser", "parse_args", "main", "EvalConfig"]

DESCRIPTION = """Accuracy of STM and its peers at several token reduction rates (the paper's Tables 2 and 3).

Without --checkpoint/--data: an embedded testbed (small Vims shipped with the package, offline): --testbed
digits (the default: three models on scikit-learn's 8x8 digits, 65 tokens, 8 layers, about a minute on two
cores), paper-geometry (Vim-Ti's 197 tokens and 24 layers on stretched digits, under 10 minutes) or
fashion-mnist (five models, 197 tokens, 12 layers, the 10,000 Fashion-MNIST test images; its claims run took
41 minutes on two cores, --limit N a quick look). With --model --checkpoint --data: an official hustvl/Vim
checkpoint on ImageNet-1k validation images. Results go to --out (resumable): results.json, results.csv,
table.md, claims.json, accuracy_vs_flops.png. docs/conventions.md defines rates, schedules and FLOPs;
docs/eval.md the statistics."""

def _paper_testbeds():
    """The testbeds with Vim-Ti's token count (every testbed puts its class token in the middle, as Vim-Ti
    does), where the paper's per-layer schedules mean what they mean on Vim-Ti."""
    tokens = MODEL_CONFIGS["vim_tiny"].num_tokens
    return tuple(n for n, bed in TESTBEDS.items() if bed.model_config.num_tokens == tokens)


_PAPER_TESTBEDS = _paper_testbeds()
_TESTBED_GRIDS = "; ".join(f"--testbed {name}, which without --methods and --rates runs {describe_grid(bed.eval_grid)}"
                           for name, bed in TESTBEDS.items() if bed.eval_grid) + " (docs/testbeds.md)"


def _data_options(ap):
    g = ap.add_argument_group("model and data (none of them: an embedded testbed)")
    g.add_argument("--testbed", default="digits", choices=list(TESTBEDS),
                   help="the embedded testbed when there is no --checkpoint/--data: digits (65 tokens, 8 layers), "
                        "paper-geometry (197 tokens, 24 layers, Vim-Ti's geometry) or fashion-mnist (197 tokens, 12 "
                        "layers, real photos; docs/testbeds.md)")
    g.add_argument("--model", default=None, choices=list_models(), metavar="NAME",
                   help="architecture of --checkpoint (vim_tiny when omitted): " + ", ".join(sorted(MODEL_CONFIGS)) +
                        ", or an official registry name; --list shows them all")
    g.add_argument("--checkpoint", help="official hustvl/Vim .pth (state dict under 'model'), or a bare state dict")
    g.add_argument("--ema", action="store_true", help="load the checkpoint's 'model_ema' weights")
    g.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture override for a custom checkpoint (" + ", ".join(OVERRIDES) + "); repeatable")
    g.add_argument("--data", help="ImageNet val folder: ImageFolder layout (val/<wnid>/*.JPEG), or flat with --labels")
    g.add_argument("--labels", help="labels for a flat folder: a CSV (filename,label or Kaggle's LOC_val_solution.csv), "
                                    "or the official ILSVRC2012_validation_ground_truth.txt (with --devkit)")
    g.add_argument("--devkit", help="ILSVRC2012 devkit folder (or its data/meta.mat) for the official ground truth")
    g.add_argument("--limit", type=positive_int, help="evaluate only the first N images (default: all)")


def _method_options(ap):
    g = ap.add_argument_group("what is evaluated")
    g.add_argument("--methods", nargs="+", default=None, choices=METHOD_GROUPS, metavar="GROUP",
                   help="method groups (default: " + " ".join(DEFAULT_GROUPS) + "; see " + _TESTBED_GRIDS + "): " +
                        "; ".join(f"{n} = {g.doc}" for n, g in GROUPS.items()))
    g.add_argument("--rates", nargs="+", type=float, default=None,
                   help="token reduction rates, fractions (0.2 = 20%%; docs/conventions.md §6; default: " +
                        " ".join(str(r) for r in DEFAULT_RATES) + ", every group at each; see " + _TESTBED_GRIDS + ")")
    g.add_argument("--schedule", help="instead of rates: tokens removed after each layer IN TOTAL, comma-separated "
                                      "(one value = every layer); STM on both sides splits each entry equally, so the "
                                      "paper's '2 tokens per direction at every layer' is --schedule 4")
    g.add_argument("--paper", nargs="?", const="literal", choices=["literal", "sensitivity", "inferred"],
                   help="instead of --rates/--schedule, the paper's Table 2 and 3 settings for vim_tiny/vim_small/vim_base "
                        "(or the testbeds " + " and ".join(_PAPER_TESTBEDS) + "): 'literal' (also a bare --paper) as its text says, two tokens per "
                        "direction at every layer; 'sensitivity' adds schedules whose FLOPs match the reported ones "
                        "('inferred' is its old name); stm_fast/eval/paper.py explains")
    g.add_argument("--stm-sides", default=STM_DEFAULTS["sides"], choices=["both", "left", "right"],
                   help="STM: which sides of the class token lose tokens")
    g.add_argument("--stm-positions", default=STM_DEFAULTS["positions"], choices=["ends", "uniform"],
                   help="STM: which tokens of a side are merged (docs/conventions.md §3)")
    g.add_argument("--stm-weights", default=STM_DEFAULTS["weights"], choices=list(TOKEN_WEIGHT_VARIANTS),
                   help="STM: the merge weights (docs/conventions.md §4)")
    g.add_argument("--stm-start-layer", type=non_negative_int, default=STM_DEFAULTS["start_layer"],
                   help="STM: the first layer after which tokens merge")


def _run_options(ap):
    g = ap.add_argument_group("how it runs")
    g.add_argument("--batch-size", type=positive_int, default=None, help="images per batch (default: 128, 360 for the embedded default)")
    g.add_argument("--workers", type=non_negative_int, default=None,
                   help="DataLoader worker processes decoding images (default: none for an embedded testbed, whose images "
                        "are in memory; for --data min(8, CPU cores) on CUDA, min(4, cores // 2) (at least 1) on the CPU)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=list(AMP_DTYPES),
                   help="autocast precision (default: fp16 on CUDA, as hustvl/Vim's own evaluation runs, fp32 elsewhere; "
                        "--dtype fp32 on CUDA runs full float32, with the run's TF32 settings recorded). Reductions "
                        "always compute in float32")
    g.add_argument("--on-bad-image", default="skip", choices=["skip", "error"],
                   help="an unreadable image is excluded and listed (skip) or stops the run (error)")
    g.add_argument("--out", help="output folder (default: runs/<date-time>); reuse it to resume a run of the same inputs, "
                                 "or to add method groups to it")
    g.add_argument("--restart", action="store_true",
                   help="discard what --out holds from an earlier run (its run.json, progress and result files) first")
    g.add_argument("--quiet", action="store_true", help="no progress bar and no table on stdout")
    g.add_argument("--figures", action="store_true",
                   help="also write the paper's Figure 1 (hidden-state and class-token attention maps per layer) for two "
                        "images and Figure 3 (class-token deviation per layer) of the first model")
    g.add_argument("--list", action="store_true", help="list the models, method groups and methods, then exit")
    g.add_argument("--no-self-check", action="store_true",
                   help="skip the check, before any work, that the scan backend and device match a float64 torch copy "
                        "on a few images, within the float32 torch backend's own error (stm_fast/selfcheck.py)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m stm_fast.eval", description=DESCRIPTION, formatter_class=HelpFormatter)
    _data_options(ap)
    _method_options(ap)
    _run_options(ap)
    return ap


def listing() -> str:
    """What ``--list`` prints: every model name with its shape, the testbeds, the method groups, the methods."""
    lines = ["models:"] + [f"  {n:16s} {describe(n)}" for n in sorted(MODEL_CONFIGS)]
    lines += ["  aliases (hustvl/Vim's registry names):"] + [f"    {a} -> {n}" for a, n in sorted(ALIASES.items())]
    lines += ["testbeds (--testbed, used without --checkpoint/--data): " + ", ".join(
        f"{n} ({TESTBEDS[n].config['img_size']}px, {len(TESTBEDS[n].seeds)} models)" for n in TESTBEDS)]
    lines += ["method groups (--methods):"] + [f"  {n:16s} {g.doc}{'' if g.default else ' (not in the default grid)'}"
                                               for n, g in GROUPS.items()]
    lines += [
              "reduction methods (stm_fast.reduce): " + ", ".join(list_methods())]
    return "\n".join(lines)


@dataclass(frozen=True)
class EvalConfig:
    """What one eval run is asked to do: the command line, checked and completed (``parse_args``)."""

    testbed: str
    model: str
    checkpoint: str | None
    ema: bool
    override: tuple
    overrides: dict
    data: str | None
    labels: str | None
    devkit: str | None
    limit: int | None
    methods: tuple  # the groups the grid runs
    rates: tuple  # the rates the grid runs
    schedule: int | tuple | None
    grid: tuple  # ((groups or None for the default ones, rates, schedule), ...): stm_fast.eval.grid
    paper: str | None
    paper_model: str | None
    stm_options: dict
    batch_size: int
    workers: int
    device: str | None
    dtype: str
    on_bad_image: str
    out: str
    restart: bool
    quiet: bool
    figures: bool
    no_self_check: bool


def _check_real_run(args):
    """--model, --ema or --override only mean something with a --checkpoint; the testbeds take neither."""
    given = [f for f, on in (("--model", args.model is not None), ("--ema", args.ema), ("--override", args.override)) if on]
    if given and args.checkpoint is None:
        raise RunError(f"{', '.join(given)} given without --checkpoint: without a checkpoint (and --data) the embedded "
                       f"digits default runs (three small Vims shipped with the package). To evaluate a real model: "
                       f"python -m stm_fast.eval --model NAME --checkpoint FILE.pth --data /path/to/imagenet/val")
    if args.testbed != "digits" and (args.checkpoint is not None or args.data is not None):
        raise RunError(f"--testbed {args.testbed} is an embedded testbed: it takes no --checkpoint/--data")


def _check_transform_serves(overrides):
    """The eval's transform (stm_fast.eval.imagenet.eval_transform) makes RGB images of any --override img_size,
    so of the overrides only channels can ask for input it cannot make."""
    channels = overrides.get("channels", 3)
    if channels != 3:
        raise RunError(f"--override channels={channels}: the eval feeds RGB images (3 channels, normalised with "
                       f"ImageNet's mean and std, docs/conventions.md §9), so a {channels}-channel model cannot be "
                       f"evaluated here: drop the override, or evaluate it from Python with your own transform")


def _schedule(text):
    """'--schedule 4' -> 4 (every layer); '0,4,2' -> (0, 4, 2): tokens removed after each layer in total."""
    if text is None:
        return None
    parts = text.replace(" ", "").split(",")
    if not all(p.isdigit() for p in parts):
        raise RunError(f"--schedule takes non-negative integers separated by commas (e.g. 4 or 0,4,4), got {text!r}")
    values = [int(v) for v in parts]
    return values[0] if len(values) == 1 else values


def _paper(args, model):
    """(--paper mode, the paper's model it runs as) or (None, None); it needs the paper's geometry (an official
    checkpoint, or the paper-geometry testbed) and no --schedule."""
    if not args.paper:
        return None, None
    if args.schedule is not None:
        raise RunError("--paper runs the paper's own schedules: drop --schedule")
    if args.checkpoint is None and args.testbed not in _PAPER_TESTBEDS:
        tokens = TESTBEDS[args.testbed].model_config.num_tokens
        raise RunError(f"--paper runs the paper's settings on its geometry: give --model and --checkpoint, or --testbed "
                       f"{' or '.join(_PAPER_TESTBEDS)} (the {args.testbed} testbed has {tokens} tokens, Vim-Ti "
                       f"{MODEL_CONFIGS['vim_tiny'].num_tokens})")
    mode = "sensitivity" if args.paper == "inferred" else args.paper
    depth = TESTBEDS[args.testbed].config["depth"]
    if args.checkpoint is None and mode == "sensitivity" and depth != MODEL_CONFIGS["vim_tiny"].depth:
        raise RunError(f"--paper sensitivity adds Vim-Ti's FLOPs-consistent schedules, one entry per layer of its 24; "
                       f"the {args.testbed} testbed has {depth} layers: use --paper literal (its schedules are per layer)")
    return mode, canonical_name(model) if args.checkpoint else "vim_tiny"


def _grid(args, schedule):
    """The run's grid (stm_fast.eval.grid): the embedded testbed's own default grid when nothing names the
    methods, rates, schedule or paper settings; else --methods x --rates (or --schedule)."""
    bed = TESTBEDS[args.testbed]
    chosen = args.methods is not None or args.rates is not None or schedule is not None or args.paper
    if not chosen and args.checkpoint is None and args.data is None and bed.eval_grid:
        return bed.eval_grid
    groups = tuple(args.methods or DEFAULT_GROUPS)
    if schedule is not None:
        return ((groups, (), schedule),)
    return ((groups, tuple(args.rates or DEFAULT_RATES), None),)


def _on_cuda(args) -> bool:
    try:
        return pick_device(args.device).type == "cuda"
    except RuntimeError:  # an unknown device name is refused later, with its own line
        return False


def _workers(args) -> int:
    """``--workers``, or its default: none for in-memory testbed images, else by device and core count."""
    if args.workers is not None:
        return args.workers
    if args.data is None:
        return 0
    cores = os.cpu_count() or 1
    return min(8, cores) if _on_cuda(args) else max(1, min(4, cores // 2))


def parse_args(argv=None) -> EvalConfig | None:
    """The checked ``EvalConfig`` of a command line (None for ``--list``); a ``RunError`` names a bad option."""
    args = build_parser().parse_args(argv)
    if args.list:
        return None
    _check_real_run(args)
    try:
        for r in args.rates or ():
            check_rate(r, "--rates")
        overrides = parse_overrides(args.override)
    except ValueError as e:
        raise RunError(str(e)) from None
    _check_transform_serves(overrides)
    model = args.model or "vim_tiny"
    paper, paper_model = _paper(args, model)
    schedule = _schedule(args.schedule)
    grid = _grid(args, schedule)
    return config_from(args, model=model, override=tuple(args.override), overrides=overrides, grid=grid,
                       methods=grid_groups(grid), rates=tuple(dict.fromkeys(r for _, rs, _ in grid for r in rs)),
                       schedule=schedule,
                       paper=paper, paper_model=paper_model, batch_size=args.batch_size or (128 if args.data else 360),
                       workers=_workers(args), dtype=args.dtype or ("fp16" if _on_cuda(args) else "fp32"),
                       out=args.out or os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S")))


_STM_PREFIX = "stm_"  # --stm-X options become stm_options["X"]


def config_from(args, **completed) -> EvalConfig:
    """The ``EvalConfig`` of parsed options, field by name: ``completed`` holds the values checked or derived
    above, every other field is the option of its name; the ``--stm-*`` options make ``stm_options``. An
    option with no field (nor a ``--stm-`` prefix) is a programming error, caught here and by the tests."""
    options = {k: v for k, v in vars(args).items() if k != "list"}
    stm = {k[len(_STM_PREFIX):]: v for k, v in options.items() if k.startswith(_STM_PREFIX)}
    names = {f.name for f in fields(EvalConfig)}
    values = {k: v for k, v in options.items() if not k.startswith(_STM_PREFIX)}
    missing = sorted(set(values) - names)
    if missing:
        raise AssertionError(f"options without an EvalConfig field: {missing}")
    return EvalConfig(**{**values, **completed, "stm_options": stm})


def _primary() -> bool:
    """Whether this process speaks for the run: anything but a torchrun worker of a rank other than 0 (a
    mistaken environment, e.g. RANK=5 without torchrun, is reported by the process that has it)."""
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    return not under_torchrun or os.environ.get("RANK", "0") == "0"


def _what(config) -> str:
    if config.data is None:
        bed = TESTBEDS[config.testbed]
        return f"the {config.testbed} testbed's {len(bed.seeds)} shipped models and its test split"
    return f"{config.model} from {config.checkpoint} and the images of {config.data}"


def _summary(config, records, seconds) -> str:
    """The closing lines: wall time, image-forwards per second, and every output file (printed even with --quiet)."""
    forwards = sum(r["images"] for r in records or [])
    cells = len(records or [])
    files = sorted(f for f in os.listdir(config.out) if os.path.isfile(os.path.join(config.out, f))
                   and not f.startswith(("progress.", ".")) and not f.endswith(".lock"))
    return (f"done in {seconds:.0f} s: {cells} cells (configuration x model), {forwards:,} image forwards, "
            f"{forwards / max(seconds, 1e-9):.0f} images/s\nresults in {config.out}: {', '.join(files)} "
            f"(docs/eval.md says what each holds)")


def main(argv=None) -> int:
    t0 = time.perf_counter()
    try:
        config = parse_args(argv)
        if config is None:
            print(listing())
            return 0
        if not config.quiet and _primary():
            print(f"stm_fast.eval: loading {_what(config)}; results will be in {config.out}", flush=True)
        records = evaluate(config)
        if records is not None and _primary():
            print(_summary(config, records, time.perf_counter() - t0))
    except (NoImagesError, CheckpointError, DataError, RunError, FileNotFoundError) as e:
        if _primary():  # under torchrun every rank meets the same option error: one line, from rank 0
            print(f"error: {e}", file=sys.stderr)
        return 3 if isinstance(e, NoImagesError) else 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished batches are saved; rerun with the same --out to resume", file=sys.stderr)
        return 130
    return 0
