"""The command line of ``python -m stm_fast.eval``: options, their checks, and the exit codes."""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

from ..checkpoint import CheckpointError
from ..merge import TOKEN_WEIGHT_VARIANTS
from ..models import list_models, parse_overrides
from ..reduction import STM_DEFAULTS, check_rate
from ..runtime import AMP_DTYPES
from .errors import RunError
from .grid import DEFAULT_RATES, METHOD_GROUPS
from .imagenet import DataError
from .run import evaluate

__all__ = ["build_parser", "parse_args", "main"]

DESCRIPTION = """Accuracy of STM and its peers at several token reduction rates (the paper's Tables 2 and 3).

Without --checkpoint/--data: the embedded default (three small Vims trained on scikit-learn's digits,
offline, about a minute on two cores). With --model --checkpoint --data: an official hustvl/Vim checkpoint on
ImageNet-1k validation images. Results go to --out (resumable): results.json, results.csv, table.md,
accuracy_vs_flops.png. docs/conventions.md defines rates, schedules and FLOPs."""

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m stm_fast.eval", description=DESCRIPTION,
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
    ap.add_argument("--schedule", help="instead of rates: tokens removed after each layer IN TOTAL, comma-separated "
                                       "(one value = every layer); STM on both sides splits each entry equally, so the "
                                       "paper's '2 tokens per direction at every layer' is --schedule 4")
    ap.add_argument("--stm-sides", default=STM_DEFAULTS["sides"], choices=["both", "left", "right"])
    ap.add_argument("--stm-positions", default=STM_DEFAULTS["positions"], choices=["ends", "uniform"])
    ap.add_argument("--stm-weights", default=STM_DEFAULTS["weights"], choices=list(TOKEN_WEIGHT_VARIANTS))
    ap.add_argument("--stm-start-layer", type=int, default=STM_DEFAULTS["start_layer"])
    ap.add_argument("--limit", type=int, help="evaluate only the first N images")
    ap.add_argument("--batch-size", type=int, default=None, help="default 128 (360 for the embedded default)")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--dtype", default="fp32", choices=list(AMP_DTYPES), help="autocast precision")
    ap.add_argument("--on-bad-image", default="skip", choices=["skip", "error"])
    ap.add_argument("--out", help="output folder (default: runs/<date-time>); reuse it to resume")
    ap.add_argument("--quiet", action="store_true")
    return ap


def _schedule(text):
    """'--schedule 4' -> 4 (every layer); '0,4,2' -> [0, 4, 2]: tokens removed after each layer in total."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise RunError(f"--schedule takes comma-separated integers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    try:
        for r in args.rates:
            check_rate(r, "--rates")
        args.overrides = parse_overrides(args.override)
    except ValueError as e:
        raise RunError(str(e)) from None
    if args.schedule:
        args.schedule = _schedule(args.schedule)
    args.stm_options = {"sides": args.stm_sides, "positions": args.stm_positions, "weights": args.stm_weights,
                        "start_layer": args.stm_start_layer}
    if args.batch_size is None:
        args.batch_size = 128 if args.data else 360
    if args.out is None:
        args.out = os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return args


def main(argv=None) -> int:
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
