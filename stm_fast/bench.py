"""Throughput of token reduction: ``python -m stm_fast.bench`` (images/s, realized vs FLOPs-predicted speedup).

Protocol: random weights and inputs (speed does not depend on them), the model in eval mode under
``torch.inference_mode``; every configuration (baseline, method x rate) is warmed up, then timed in
interleaved rounds (round r times each configuration once, so drifts of the machine hit all of them
alike); the median over rounds is reported. CUDA is synchronised around each timed forward; TF32 is
left at PyTorch's default and reported. speedup = baseline median / configuration median (same run);
ideal_speedup = baseline GFLOPs / configuration GFLOPs under the ``full`` convention (both scan
directions, what actually runs); realized_over_ideal = speedup / ideal_speedup. speedup_per_round (the table's "rounds' speedups",
min-max) is baseline time / configuration time within each round: how much the machine moved during
the run.
After the throughput rounds, each reduced configuration runs ``rounds`` more forwards with its reduction
step timed inside the forward (CUDA synchronised around it; these forwards are not used for throughput):
step_ms is the median time per forward spent in reduction steps (selection + merge/prune), step_share
that time over the same forward's time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from .flops import flops
from .models import OVERRIDES, create_model, list_models, parse_overrides
from .reduction import check_rate, list_methods, make_reduction, reduced
from .registry import MODEL_CONFIGS
from .selfcheck import SelfCheckFailed, describe_check, self_check
from .ssm import resolve_backend
from .runtime import (AMP_DTYPES, HelpFormatter, atomic_write_json, autocast, check_device, flush_denormals,
                      non_negative_int, pick_device, positive_int, synchronize)

__all__ = ["run_bench", "main", "build_parser", "table"]


def _configurations(model, methods, rates, name):
    """[(method, rate, Reduction)] to time, the baseline first; infeasible ones are skipped with a line."""
    configs = [("none", 0.0, make_reduction(model, "none"))]
    for m in methods:
        for r in rates:
            try:
                configs.append((m, r, make_reduction(model, m, rate=r)))
            except ValueError as e:
                print(f"skip {name} {m} {r}: {e}", file=sys.stderr)
    return configs


def _timed_forward(model, x, device, dtype):
    """One forward of the model as it is (its installed reduction), timed with the device synchronised."""
    with torch.inference_mode(), autocast(device, dtype):
        synchronize(device)
        t0 = time.perf_counter()
        model(x)
        synchronize(device)
        return time.perf_counter() - t0


def _interleaved_times(model, x, configs, device, dtype, rounds, warmup, progress, name):
    """{config index: [seconds per round]}: every configuration warmed up, then timed once per round."""
    def forward(reduction):
        with reduced(model, reduction):
            return _timed_forward(model, x, device, dtype)

    for _, _, reduction in configs:
        for _ in range(warmup):
            forward(reduction)
    times = {i: [] for i in range(len(configs))}
    for r in range(rounds):
        for i, (_, _, reduction) in enumerate(configs):
            times[i].append(forward(reduction))
        if progress:
            print(f"{name}: round {r + 1}/{rounds}", file=sys.stderr)
    return times


def run_bench(model_names=("vim_tiny",), methods=("stm", "tome", "top", "evit"), rates=(0.15, 0.2, 0.3, 0.4),
              device=None, batch_size=None, dtype="fp32", rounds=7, warmup=2, progress=True, overrides=None,
              check=True):
    """Rows of the benchmark table (see the module docstring); ``overrides`` go to ``create_model``; ``check``:
    run ``stm_fast.selfcheck.self_check`` on each model first (SelfCheckFailed stops the bench)."""
    device = pick_device(device)
    batch_size = batch_size or (256 if device.type == "cuda" else 8)
    rows = []
    for name in model_names:
        torch.manual_seed(0)
        model = create_model(name, device=device, **(overrides or {}))
        x = torch.randn(batch_size, model.cfg.channels, model.cfg.img_size, model.cfg.img_size, device=device)
        checked = self_check(model, x[:4], device, random_weights=True) if check else None
        if checked and progress:
            print(describe_check(checked), file=sys.stderr)
        configs = _configurations(model, methods, rates, name)
        times = _interleaved_times(model, x, configs, device, dtype, rounds, warmup, progress, name)
        base_flops = flops(model.cfg, convention="full", reduction=None)["total"]
        base = statistics.median(times[0])
        for i, (method, rate, reduction) in enumerate(configs):
            med = statistics.median(times[i])
            step_ms = step_share = None
            if reduction.active:
                step_ms, step_share = _step_cost(model, x, reduction, device, dtype, rounds)
            ideal = base_flops / flops(model.cfg, convention="full", reduction=reduction)["total"]
            rows.append({"model": name, "method": method, "rate": rate, "achieved_rate": reduction.rate,
                         "batch_size": batch_size, "dtype": dtype, "device": _device_name(device),
                         "images_per_s": batch_size / med, "speedup": base / med, "ideal_speedup": ideal,
                         "realized_over_ideal": (base / med) / ideal, "median_s": med,
                         "speedup_per_round": [b / t for b, t in zip(times[0], times[i])],  # the run's own noise
                         "step_ms": step_ms, "step_share": step_share, "self_check": checked,
                         "backend": resolve_backend(None, device),
                         "tf32": bool(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" else None})
    return rows


def _step_cost(model, x, reduction, device, dtype, rounds):
    """Median over ``rounds`` forwards of the time spent in the reduction steps (ms) and of its share of the
    forward, measured through the reduction's step hook (the device synchronised around each step)."""
    spent = [0.0]

    def timed(step, args):
        synchronize(device)
        t0 = time.perf_counter()
        out = step(*args)
        synchronize(device)
        spent[0] += time.perf_counter() - t0
        return out

    ms, share = [], []
    with reduced(model, reduction.with_step_hook(timed)):
        for _ in range(rounds):
            spent[0] = 0.0
            total = _timed_forward(model, x, device, dtype)
            ms.append(1e3 * spent[0])
            share.append(spent[0] / total)
    return statistics.median(ms), statistics.median(share)


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def table(rows):
    out = ["| model | method | rate | images/s | speedup | rounds' speedups | ideal | realized/ideal | step ms/forward "
           "| step share |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        step = ("| - | - |" if r.get("step_ms") is None
                else f"| {r['step_ms']:.1f} | {100 * r['step_share']:.2f}% |")
        rounds = r.get("speedup_per_round") or [r["speedup"]]
        out.append(f"| {r['model']} | {r['method']} | {100 * r['rate']:.0f}% | {r['images_per_s']:.1f} | "
                   f"{r['speedup']:.2f} | {min(rounds):.2f}-{max(rounds):.2f} | {r['ideal_speedup']:.2f} | "
                   f"{r['realized_over_ideal']:.2f} " + step)
    dev = rows[0]["device"] if rows else "?"
    backend = rows[0].get("backend", "?") if rows else "?"
    return ("\n".join(out) + f"\n\nbatch {rows[0]['batch_size'] if rows else '?'}, {rows[0]['dtype'] if rows else ''}, {dev}, "
            f"scan backend {backend}")


def _check_json_path(path):
    """ValueError unless ``--json`` names a file that can be written (checked before the run, not after it)."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"--json {path} is a folder: give a file name, e.g. {os.path.join(path, 'bench.json')}")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"--json {path}: the folder {folder} does not exist or is not writable")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m stm_fast.bench", description=__doc__, formatter_class=HelpFormatter)
    methods = [m for m in list_methods() if m != "none"]
    ap.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--model", nargs="+", default=["vim_tiny"], choices=list_models(), metavar="NAME",
                    help="models to time (random weights): " + ", ".join(sorted(MODEL_CONFIGS)) +
                         " or an official registry name (--list shows them)")
    ap.add_argument("--methods", nargs="+", default=methods, choices=methods, metavar="METHOD",
                    help="reduction methods, any of: " + ", ".join(methods) + " (the baseline is always timed)")
    ap.add_argument("--rates", nargs="+", type=float, default=[0.15, 0.2, 0.3, 0.4], help="fractions (0.2 = 20%%)")
    ap.add_argument("--batch-size", type=positive_int, help="images per forward (default: 8 on CPU, 256 on CUDA)")
    ap.add_argument("--dtype", default="fp32", choices=list(AMP_DTYPES), help="autocast precision")
    ap.add_argument("--rounds", type=positive_int, default=7,
                    help="interleaved timed rounds (medians); 5 proved too few on a noisy 2-core machine")
    ap.add_argument("--warmup", type=non_negative_int, default=2, help="untimed forwards per configuration before the rounds")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="architecture override (" + ", ".join(OVERRIDES) + "); repeatable")
    ap.add_argument("--list", action="store_true", help="list the models and methods, then exit")
    ap.add_argument("--no-self-check", action="store_true",
                    help="skip the check that the scan backend agrees with the torch backend (stm_fast/selfcheck.py)")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.list:
        print("models: " + ", ".join(list_models()) + "\nmethods: " + ", ".join(args.methods))
        return 0
    try:
        overrides = parse_overrides(args.override)
        for r in args.rates:
            check_rate(r, "--rates")
        check_device(args.device)
        _check_json_path(args.json)
    except ValueError as e:
        ap.error(str(e))
    try:
        with flush_denormals():  # as stm_fast.eval: subnormal decays would time the FPU, not the method
            rows = run_bench(args.model, args.methods, args.rates, args.device, args.batch_size, args.dtype, args.rounds,
                             args.warmup, overrides=overrides, check=not args.no_self_check)
    except SelfCheckFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(rows))
    if args.json:
        atomic_write_json(args.json, rows, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
