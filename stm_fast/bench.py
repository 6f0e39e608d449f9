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
import json
import platform
import statistics
import sys
import time

import torch

from .flops import flops
from .models import create_model, parse_overrides
from .reduce import reduce
from .scan import flush_denormals

__all__ = ["run_bench", "main"]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_bench(model_names=("vim_tiny",), methods=("stm", "tome", "top", "evit"), rates=(0.15, 0.2, 0.3, 0.4),
              device=None, batch_size=None, dtype="fp32", rounds=7, warmup=2, progress=True, overrides=None):
    """Rows of the benchmark table (see the module docstring); ``overrides`` go to ``create_model``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch_size = batch_size or (256 if device.type == "cuda" else 8)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    rows = []
    for name in model_names:
        torch.manual_seed(0)
        model = create_model(name, device=device, **(overrides or {}))
        x = torch.randn(batch_size, model.cfg.channels, model.cfg.img_size, model.cfg.img_size, device=device)
        configs = [("none", 0.0, None)]
        for m in methods:
            for r in rates:
                try:
                    reduce(model, m, rate=r)
                    configs.append((m, r, (model.reducer, model.reduction)))
                except ValueError as e:
                    print(f"skip {name} {m} {r}: {e}", file=sys.stderr)
        reduce(model, "none")
        base_flops = flops(model, model.cfg.img_size, "full")["total"]

        def forward(cfg):
            model.reducer, model.reduction = cfg[2] if cfg[2] else (None, None)
            with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                _sync(device)
                t0 = time.perf_counter()
                model(x)
                _sync(device)
                return time.perf_counter() - t0

        for cfg in configs:
            for _ in range(warmup):
                forward(cfg)
        times = {i: [] for i in range(len(configs))}
        for r in range(rounds):
            for i, cfg in enumerate(configs):
                times[i].append(forward(cfg))
            if progress:
                print(f"{name}: round {r + 1}/{rounds}", file=sys.stderr)
        base = statistics.median(times[0])
        for i, (m, rate, plan) in enumerate(configs):
            med = statistics.median(times[i])
            per_round = [b / t for b, t in zip(times[0], times[i])]  # same-round speedups: the run's own noise
            step_ms = step_share = None
            if plan:
                step_ms, step_share = _step_cost(plan[0], lambda: forward(configs[i]), rounds, device)
            if plan:
                model.reducer, model.reduction = plan
            else:
                reduce(model, "none")
            f = flops(model, model.cfg.img_size, "full")
            ideal = base_flops / f["total"]
            rows.append({"model": name, "method": m, "rate": rate,
                         "achieved_rate": model.reduction["rate"] if plan else 0.0,
                         "batch_size": batch_size, "dtype": dtype, "device": _device_name(device),
                         "images_per_s": batch_size / med, "speedup": base / med, "ideal_speedup": ideal,
                         "realized_over_ideal": (base / med) / ideal, "median_s": med,
                         "speedup_per_round": per_round,
                         "step_ms": step_ms, "step_share": step_share,
                         "tf32": bool(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" else None})
        reduce(model, "none")
    return rows


def _step_cost(reducer, forward, rounds, device):
    """Median over ``rounds`` forwards of the time spent in ``reducer.step`` (ms) and of its share of the forward."""
    real, spent = reducer.step, [0.0]

    def timed(*args):
        _sync(device)
        t0 = time.perf_counter()
        out = real(*args)
        _sync(device)
        spent[0] += time.perf_counter() - t0
        return out

    reducer.step = timed  # an instance attribute shadows the method until deleted
    try:
        ms, share = [], []
        for _ in range(rounds):
            spent[0] = 0.0
            total = forward()
            ms.append(1e3 * spent[0])
            share.append(spent[0] / total)
    finally:
        del reducer.step
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
    return "\n".join(out) + f"\n\nbatch {rows[0]['batch_size'] if rows else '?'}, {rows[0]['dtype'] if rows else ''}, {dev}"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m stm_fast.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device")
    ap.add_argument("--model", nargs="+", default=["vim_tiny"])
    ap.add_argument("--methods", nargs="+", default=["stm", "tome", "top", "evit"])
    ap.add_argument("--rates", nargs="+", type=float, default=[0.15, 0.2, 0.3, 0.4], help="fractions (0.2 = 20%%)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds (medians); 5 proved too few on a noisy 2-core machine")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="architecture override (img_size, patch_size, embed_dim, depth, d_state, ...); repeatable")
    args = ap.parse_args(argv)
    try:
        overrides = parse_overrides(args.override)
    except ValueError as e:
        ap.error(str(e))
    bad = [r for r in args.rates if not 0 <= r < 1]
    if bad:
        ap.error(f"--rates takes fractions in [0, 1) (0.2 means 20%), got {bad}")
    with flush_denormals():  # as stm_fast.eval: subnormal decays would time the FPU, not the method
        rows = run_bench(args.model, args.methods, args.rates, args.device, args.batch_size, args.dtype, args.rounds,
                         args.warmup, overrides=overrides)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
