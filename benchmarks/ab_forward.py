"""Interleaved A/B timing of the Vim forward between two checkouts of this repository.

    python benchmarks/ab_forward.py --a /path/to/old/checkout --b . --rounds 8 [--model vim_tiny] [--batch 8]
                                    [--method stm --rate 0.4]

Each round starts one process per checkout, in the order A, B (then B, A in the next round, so neither
side always runs first), each building the same random-weight model (seed 0), warming up, and timing
``--forwards`` forwards under inference mode (with ``--method``, reduced by ``stm_fast.reduce(model, method,
rate=...)``); a process reports its median. The script prints every
round's B/A ratio and the median ratio with its min-max: the run's own spread. Run it on a quiet machine.

``--pairs N`` instead keeps one process per checkout alive and alternates single forwards between them
(A, B, B, A, ...) N times: the ratio of each adjacent pair, without the process-to-process spread of
memory layout and start-up (on a noisy VM that spread is larger than the effects measured).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time, torch
sys.path.insert(0, sys.argv[1])
import stm_fast
try:
    from stm_fast.runtime import flush_denormals
except ImportError:
    from stm_fast.scan import flush_denormals
torch.manual_seed(0)
model = stm_fast.create_model(sys.argv[2])
if sys.argv[5] != "none":
    stm_fast.reduce(model, sys.argv[5], rate=float(sys.argv[6]))
x = torch.randn(int(sys.argv[3]), 3, 224, 224)
times = []
with flush_denormals(), torch.inference_mode():
    model(x)
    for _ in range(int(sys.argv[4])):
        t0 = time.perf_counter(); model(x); times.append(time.perf_counter() - t0)
print(json.dumps({"median": statistics.median(times), "module": stm_fast.__file__}))
"""


SERVER = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
import stm_fast
from stm_fast.runtime import flush_denormals
torch.manual_seed(0)
model = stm_fast.create_model(sys.argv[2])
if sys.argv[5] != "none":
    stm_fast.reduce(model, sys.argv[5], rate=float(sys.argv[6]))
x = torch.randn(int(sys.argv[3]), 3, 224, 224)
with flush_denormals(), torch.inference_mode():
    for _ in range(3):
        model(x)
    print("ready", flush=True)
    for line in sys.stdin:
        t0 = time.perf_counter(); model(x); print(time.perf_counter() - t0, flush=True)
"""


def _pairs(args):
    """Alternate single forwards between two live processes; returns the B/A ratios of adjacent pairs."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    procs = {side: subprocess.Popen([sys.executable, "-c", SERVER, os.path.abspath(getattr(args, side)), args.model,
                                     str(args.batch), "0", args.method, str(args.rate)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, env=env, cwd="/") for side in ("a", "b")}
    for p in procs.values():
        assert p.stdout.readline().strip() == "ready"

    def once(side):
        procs[side].stdin.write("go\n")
        procs[side].stdin.flush()
        return float(procs[side].stdout.readline())

    ratios = []
    for i in range(args.pairs):
        order = ("a", "b") if i % 2 == 0 else ("b", "a")
        t = {side: once(side) for side in order}
        ratios.append(t["b"] / t["a"])
    for p in procs.values():
        p.stdin.close()
        p.wait()
    return ratios


def _time(checkout, args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", CHILD, os.path.abspath(checkout), args.model, str(args.batch),
                          str(args.forwards), args.method, str(args.rate)], capture_output=True, text=True, check=True, env=env, cwd="/")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="checkout A (e.g. the commit before a change)")
    ap.add_argument("--b", required=True, help="checkout B (e.g. the change)")
    ap.add_argument("--model", default="vim_tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--forwards", type=int, default=3, help="timed forwards per process (median)")
    ap.add_argument("--method", default="none", help="a reduction method to install (default: the plain model)")
    ap.add_argument("--rate", type=float, default=0.2, help="its rate, with --method")
    ap.add_argument("--pairs", type=int, default=0, help="alternate N single forwards between two live processes")
    args = ap.parse_args(argv)
    if args.pairs:
        r = sorted(_pairs(args))
        q = lambda f: r[min(len(r) - 1, int(f * len(r)))]  # noqa: E731
        print(f"B/A median {statistics.median(r):.3f} [quartiles {q(0.25):.3f}-{q(0.75):.3f}, min-max {r[0]:.3f}-{r[-1]:.3f}] "
              f"over {len(r)} adjacent pairs ({args.model}, batch {args.batch}, {args.method})")
        return 0
    ratios = []
    for r in range(args.rounds):
        order = ("a", "b") if r % 2 == 0 else ("b", "a")
        got = {side: _time(getattr(args, side), args) for side in order}
        ratios.append(got["b"]["median"] / got["a"]["median"])
        print(f"round {r + 1}: A {got['a']['median']:.3f} s  B {got['b']['median']:.3f} s  B/A {ratios[-1]:.3f}", flush=True)
    print(f"B/A median {statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}] over {len(ratios)} rounds "
          f"({args.model}, batch {args.batch}, {args.method}{'' if args.method == 'none' else f' at {args.rate}'}; "
          f"A = {got['a']['module']}, B = {got['b']['module']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
