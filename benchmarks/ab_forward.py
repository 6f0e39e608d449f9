"""Interleaved A/B timing of the Vim forward between two checkouts of this repository.

    python benchmarks/ab_forward.py --a /path/to/old/checkout --b . --rounds 8 [--model vim_tiny] [--batch 8]

Each round starts one process per checkout, in the order A, B (then B, A in the next round, so neither
side always runs first), each building the same random-weight model (seed 0), warming up, and timing
``--forwards`` forwards under inference mode; a process reports its median. The script prints every
round's B/A ratio and the median ratio with its min-max: the run's own spread. Run it on a quiet machine.
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
x = torch.randn(int(sys.argv[3]), 3, 224, 224)
times = []
with flush_denormals(), torch.inference_mode():
    model(x)
    for _ in range(int(sys.argv[4])):
        t0 = time.perf_counter(); model(x); times.append(time.perf_counter() - t0)
print(json.dumps({"median": statistics.median(times), "module": stm_fast.__file__}))
"""


def _time(checkout, args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", CHILD, os.path.abspath(checkout), args.model, str(args.batch),
                          str(args.forwards)], capture_output=True, text=True, check=True, env=env, cwd="/")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="checkout A (e.g. the commit before a change)")
    ap.add_argument("--b", required=True, help="checkout B (e.g. the change)")
    ap.add_argument("--model", default="vim_tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--forwards", type=int, default=3, help="timed forwards per process (median)")
    args = ap.parse_args(argv)
    ratios = []
    for r in range(args.rounds):
        order = ("a", "b") if r % 2 == 0 else ("b", "a")
        got = {side: _time(getattr(args, side), args) for side in order}
        ratios.append(got["b"]["median"] / got["a"]["median"])
        print(f"round {r + 1}: A {got['a']['median']:.3f} s  B {got['b']['median']:.3f} s  B/A {ratios[-1]:.3f}", flush=True)
    print(f"B/A median {statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}] over {len(ratios)} rounds "
          f"({args.model}, batch {args.batch}; A = {got['a']['module']}, B = {got['b']['module']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
