"""Throughput of token reduction: ``python -m stm_fast.bench`` (images/s, realized vs FLOPs-predicted speedup).

Protocol: random weights and inputs (speed does not depend on them), the model in eval mode under
``torch.inference_mode``; every configuration (baseline, method x rate) is warmed up, then timed in
interleaved rounds (round r times each configuration once, so drifts of the machine hit all of them
alike); the median over rounds is reported. ``--protocol`` picks the settings: ``house`` (one forward per
configuration and round, fp32) or ``rmeeto``, the field's anchor (R-MeeTo's ``throughput()``, behind Vim's
published figures: batch 128, ``model.half()`` under fp16 autocast, 100 warm-up forwards, 30 back-to-back
forwards timed as one block with CUDA events). TF32 is left at PyTorch's defaults (matmul off, cuDNN
convolutions on) and both flags are reported in every row, with the protocol, dtype and the scan backends
that actually ran (the automatic choice is made per call: a method whose call needs what the first choice
lacks, such as ToP's decay scales, gets the next backend that takes it). speedup = baseline median / configuration median (same run);
ideal_speedup = baseline GFLOPs / configuration GFLOPs under the ``full`` convention (both scan
directions, what actually runs); realized_over_ideal = speedup / ideal_speedup. speedup_per_round (the table's "rounds' speedups",
min-max) is baseline time / configuration time within each round: how much the machine moved during
the run.
After the throughput rounds, each reduced configuration runs ``rounds`` more forwards with its reduction
step timed inside the forward (CUDA synchronised around it; these forwards are not used for throughput):
step_ms is the median time per forward spent in reduction steps (selection + merge/prune), step_share
that time over the same forward's time.
Scan backends (``--backend fused torch``): every configuration of every backend is timed in the same
rounds; speedups are against the same backend's baseline, and ``speedup_over_backend`` is the other
backend's time over this one's for the same configuration (median of the rounds' ratios).
On CPU in fp32 each baseline row also carries the floor (``stm_fast.floor``: the forward's matrix products
alone, timed in every round beside the forwards, + its scan exponentials at this machine's exp2 rate) and
``over_floor``, the median over rounds of forward time / that round's floor.
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
from .floor import forward_floor, linear_pass_seconds
from .ops.backends import names as backend_names
from .ssm import BackendUnavailable, backends_used, resolve_backend
from .runtime import (AMP_DTYPES, HelpFormatter, atomic_write_json, autocast, check_device, flush_denormals,
                      non_negative_int, pick_device, positive_int, synchronize, tf32_settings)

__all__ = ["run_bench", "main", "build_parser", "table"]


def _configurations(model, x, methods, rates, name, backends, device, dtype):
    """[(backend, method, rate, Reduction)] to time, each backend's baseline first; infeasible ones, and those
    a forced backend cannot run (e.g. ToP's decay scales on a kernel without them), are skipped with a line.
    ``backends``: {label: the backend forced, or None for the automatic choice, made per call}."""
    reductions = [("none", 0.0, make_reduction(model, "none"))]
    for m in methods:
        for r in rates:
            try:
                reductions.append((m, r, make_reduction(model, m, rate=r)))
            except ValueError as e:
                print(f"skip {name} {m} {r}: {e}", file=sys.stderr)
    configs = []
    for label, forced in backends.items():
        for m, r, reduction in reductions:
            try:
                model.set_scan_backend(forced)
                with reduced(model, reduction):
                    _timed_forward(model, x[:1], device, dtype)
            except BackendUnavailable as e:
                print(f"skip {name} {label} {m} {r}: {e}", file=sys.stderr)
                continue
            configs.append((label, m, r, reduction))
    return configs


PROTOCOLS = {
    # this package's own: 7 interleaved rounds of one forward each, median, fp32 unless --dtype says otherwise
    "house": dict(batch_size=None, dtype="fp32", half=False, warmup=2, rounds=7, per_round=1),
    # R-MeeTo's throughput() (also behind Vim's published figures): batch 128, model.half() under fp16
    # autocast, 100 warm-up forwards, then 30 back-to-back forwards timed as one block (CUDA events on CUDA);
    # here every configuration's block is repeated in 3 interleaved rounds, so the run shows its own spread
    "rmeeto": dict(batch_size=128, dtype="fp16", half=True, warmup=100, rounds=3, per_round=30),
}


def _timed_forward(model, x, device, dtype, n=1):
    """Seconds per forward of the model as it is (its installed reduction) over ``n`` back-to-back forwards,
    timed as one block: CUDA events on CUDA, the clock with the device synchronised elsewhere."""
    with torch.inference_mode(), autocast(device, dtype):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            synchronize(device)
            start.record()
            for _ in range(n):
                model(x)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / n
        t0 = time.perf_counter()
        for _ in range(n):
            model(x)
        return (time.perf_counter() - t0) / n


def _interleaved_times(model, x, configs, forced, device, dtype, rounds, warmup, progress, name, floor_pass=None,
                       per_round=1):
    """({config index: [seconds per round]}, {config index: the scan backends that ran}): every configuration
    warmed up, then timed once per round; with ``floor_pass`` (a function returning seconds) also its time in
    every round, under the key "floor". ``forced``: {backend label: the backend to force, None = automatic};
    ``per_round``: back-to-back forwards timed as one block per configuration and round."""
    def forward(backend, reduction, n=1):
        model.set_scan_backend(forced[backend])
        with reduced(model, reduction):
            return _timed_forward(model, x, device, dtype, n)

    ran = {}
    for i, (backend, _, _, reduction) in enumerate(configs):
        with backends_used() as used:
            forward(backend, reduction, max(warmup, 1))
        ran[i] = "+".join(sorted(used))
    times = {i: [] for i in range(len(configs))}
    if floor_pass:
        floor_pass()
        times["floor"] = []
    for r in range(rounds):
        for i, (backend, _, _, reduction) in enumerate(configs):
            times[i].append(forward(backend, reduction, per_round))
        if floor_pass:
            times["floor"].append(floor_pass())
        if progress:
            print(f"{name}: round {r + 1}/{rounds}", file=sys.stderr)
    return times, ran


def _backends(backends, device):
    """{label: backend to force} of the backends to time; no ``backends``: the automatic choice, made per call
    (a method's call may need what the first choice lacks), labelled by the choice for a plain float32 scan.
    BackendUnavailable names a forced one that cannot run here."""
    if not backends:
        return {resolve_backend(None, device, torch.float32): None}
    return {b: b for b in dict.fromkeys(resolve_backend(b, device, torch.float32) for b in backends)}


def _self_checks(model, x, device, backends, precision, progress):
    """{backend label: self-check record} for each backend timed (SelfCheckFailed stops the bench)."""
    checks = {}
    for label, forced in backends.items():
        checks[label] = self_check(model.set_scan_backend(forced), x[:2], device, random_weights=True, precision=precision)
        if progress:
            print(describe_check(checks[label]), file=sys.stderr)
    return checks


def _settings(protocol, device, batch_size, dtype, rounds, warmup):
    """The protocol's settings with the explicitly given ones (not None) on top; batch 8 on CPU, 256 on CUDA
    where neither says."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    given = dict(batch_size=batch_size, dtype=dtype, rounds=rounds, warmup=warmup)
    out = {**PROTOCOLS[protocol], **{k: v for k, v in given.items() if v is not None}, "protocol": protocol}
    out["batch_size"] = out["batch_size"] or (256 if device.type == "cuda" else 8)
    return out


def run_bench(model_names=("vim_tiny",), methods=("stm", "tome", "top", "evit"), rates=(0.15, 0.2, 0.3, 0.4),
              device=None, batch_size=None, dtype=None, rounds=None, warmup=None, progress=True, overrides=None,
              check=True, backends=None, protocol="house", on_rows=None):
    """Rows of the benchmark table (see the module docstring); ``overrides`` go to ``create_model``; ``check``:
    run ``stm_fast.selfcheck.self_check`` on each model and backend first (SelfCheckFailed stops the bench);
    ``backends``: scan backends to time in the same interleaved rounds (None: the automatic choice, per call);
    ``protocol``: a preset of ``PROTOCOLS`` whose settings the other arguments, where given, replace;
    ``on_rows(rows)``: called with the rows so far after every model (the CLI writes --json then, so a run
    cut short keeps what it measured)."""
    device = pick_device(device)
    st = _settings(protocol, device, batch_size, dtype, rounds, warmup)
    backends = _backends(backends, device)
    rows = []
    for name in model_names:
        torch.manual_seed(0)
        model = create_model(name, device=device, **(overrides or {}))
        model = model.half() if st["half"] else model
        x = torch.randn(st["batch_size"], model.cfg.channels, model.cfg.img_size, model.cfg.img_size, device=device,
                        dtype=torch.float16 if st["half"] else torch.float32)
        checks = _self_checks(model, x, device, backends, st["dtype"], progress) if check else {}
        configs = _configurations(model, x, methods, rates, name, backends, device, st["dtype"])
        floor_pass = ((lambda: linear_pass_seconds(model, st["batch_size"]))
                      if device.type == "cpu" and st["dtype"] == "fp32" and not st["half"] else None)
        times, ran = _interleaved_times(model, x, configs, backends, device, st["dtype"], st["rounds"], st["warmup"],
                                        progress, name, floor_pass, st["per_round"])
        floor = forward_floor(model, st["batch_size"], times.pop("floor")) if floor_pass else None
        rows += _rows(model, x, name, configs, times, checks, floor, device, st, backends, ran)
        if on_rows is not None:
            on_rows(rows)
    return rows


def _rows(model, x, name, configs, times, checks, floor, device, st, forced, ran):
    """One row per configuration: speedups against the same backend's baseline, ratios to the other backends'
    same configuration, and for baselines the ratio to the floor."""
    base_flops = flops(model.cfg, convention="full", reduction=None)["total"]
    batch_size = x.shape[0]
    base = {b: i for i, (b, m, _, _) in enumerate(configs) if m == "none"}
    same = {(b, m, r): i for i, (b, m, r, _) in enumerate(configs)}
    rows = []
    for i, (backend, method, rate, reduction) in enumerate(configs):
        med, b_times = statistics.median(times[i]), times[base[backend]]
        step_ms = step_share = None
        if reduction.active:
            model.set_scan_backend(forced[backend])
            step_ms, step_share = _step_cost(model, x, reduction, device, st["dtype"], st["rounds"])
        ideal = base_flops / flops(model.cfg, convention="full", reduction=reduction)["total"]
        others = {o: [t / s for t, s in zip(times[same[(o, method, rate)]], times[i])] for o in base if o != backend}
        rows.append({"model": name, "backend": backend, "backends_ran": ran[i], "method": method, "rate": rate,
                     "achieved_rate": reduction.rate, "batch_size": batch_size, "dtype": st["dtype"],
                     "protocol": st["protocol"], "half_model": st["half"], "warmup": st["warmup"],
                     "rounds": st["rounds"], "forwards_per_round": st["per_round"],
                     "device": _device_name(device), "images_per_s": batch_size / med,
                     "speedup": statistics.median(b_times) / med, "ideal_speedup": ideal,
                     "realized_over_ideal": statistics.median(b_times) / med / ideal, "median_s": med,
                     "seconds_per_round": times[i],
                     "speedup_per_round": [b / t for b, t in zip(b_times, times[i])],  # the run's own noise
                     "speedup_over_backend": {o: statistics.median(v) for o, v in others.items()},
                     "speedup_over_backend_per_round": others, "step_ms": step_ms, "step_share": step_share,
                     "self_check": checks.get(backend), "floor": floor if method == "none" else None,
                     "over_floor": (statistics.median(t / f for t, f in zip(times[i], floor["floor_per_round"]))
                                    if floor and method == "none" else None),
                     "tf32": tf32_settings() if device.type == "cuda" else None})
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
    out = ["| model | backend | method | rate | images/s | speedup | rounds' speedups | ideal | realized/ideal "
           "| step ms/forward | step share |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        step = ("| - | - |" if r.get("step_ms") is None
                else f"| {r['step_ms']:.1f} | {100 * r['step_share']:.2f}% |")
        rounds = r.get("speedup_per_round") or [r["speedup"]]
        out.append(f"| {r['model']} | {r.get('backend', '?')} | {r['method']} | {100 * r['rate']:.0f}% | "
                   f"{r['images_per_s']:.1f} | {r['speedup']:.2f} | {min(rounds):.2f}-{max(rounds):.2f} | "
                   f"{r['ideal_speedup']:.2f} | {r['realized_over_ideal']:.2f} " + step)
    if not rows:
        return "\n".join(out)
    first = rows[0]
    tf32 = first.get("tf32")
    notes = [f"protocol {first.get('protocol', 'house')}: batch {first['batch_size']}, {first['dtype']}"
             f"{' (model.half())' if first.get('half_model') else ''}, {first['device']}"
             + (f", TF32 matmul {'on' if tf32['matmul'] else 'off'}, cuDNN {'on' if tf32['cudnn'] else 'off'}" if tf32 else "")]
    notes += [line for r in rows if r["method"] == "none" for line in _baseline_notes(r)]
    return "\n".join(out) + "\n\n" + "\n".join(notes)


def _baseline_notes(r):
    """The lines under the table for one baseline row: its ratio to the floor, and to the other backends."""
    lines = []
    f = r.get("floor")
    if f:
        lines.append(f"{r['model']} {r['backend']}: forward {r['median_s']:.3f} s = {r['over_floor']:.2f} x the floor "
                     f"{f['floor_s']:.3f} s (matrix products {f['matmul_s']:.3f} s + {f['exps'] / 1e6:.0f} M exps at "
                     f"{f['exp2_per_s'] / 1e9:.2f} G/s by {f['exp2_by']}: {f['exp_s']:.3f} s)")
    for other, per_round in (r.get("speedup_over_backend_per_round") or {}).items():
        lines.append(f"{r['model']} {r['backend']}: baseline forward {statistics.median(per_round):.2f} x as fast as "
                     f"{other} in the same rounds ({min(per_round):.2f}-{max(per_round):.2f})")
    return lines


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
    ap.add_argument("--protocol", default="house", choices=list(PROTOCOLS),
                    help="settings preset: house (7 interleaved rounds of one forward, fp32, batch 8 on CPU / 256 on "
                         "CUDA, 2 warm-up forwards) or rmeeto (R-MeeTo's throughput(), behind Vim's published figures: "
                         "batch 128, model.half() under fp16 autocast, 100 warm-up forwards, blocks of 30 forwards "
                         "timed with CUDA events, 3 interleaved rounds); the options below replace its settings")
    ap.add_argument("--batch-size", type=positive_int, help="images per forward (default: the protocol's)")
    ap.add_argument("--dtype", default=None, choices=list(AMP_DTYPES), help="autocast precision (default: the protocol's)")
    ap.add_argument("--rounds", type=positive_int, default=None,
                    help="interleaved timed rounds (medians; default: the protocol's); 5 proved too few on a noisy "
                         "2-core machine")
    ap.add_argument("--warmup", type=non_negative_int, default=None,
                    help="untimed forwards per configuration before the rounds (default: the protocol's)")
    ap.add_argument("--backend", nargs="+", choices=[b for b in backend_names() if b != "loop"], metavar="NAME",
                    help="scan backends to time in the same interleaved rounds, any of: " +
                         ", ".join(b for b in backend_names() if b != "loop") + " (default: the automatic choice)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="architecture override (" + ", ".join(OVERRIDES) + "); repeatable")
    ap.add_argument("--list", action="store_true", help="list the models and methods, then exit")
    ap.add_argument("--no-self-check", action="store_true",
                    help="skip the check that each scan backend matches a float64 torch copy within the float32 torch "
                         "backend's own error (stm_fast/selfcheck.py)")
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
        _backends(args.backend, pick_device(args.device))
    except (ValueError, BackendUnavailable) as e:
        ap.error(str(e))
    try:
        with flush_denormals():  # as stm_fast.eval: subnormal decays would time the FPU, not the method
            rows = run_bench(args.model, args.methods, args.rates, args.device, args.batch_size, args.dtype, args.rounds,
                             args.warmup, overrides=overrides, check=not args.no_self_check, backends=args.backend,
                             protocol=args.protocol,
                             on_rows=(lambda rows: atomic_write_json(args.json, rows, indent=1)) if args.json else None)
    except SelfCheckFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
