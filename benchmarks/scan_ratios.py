"""Interleaved timing of the scan backends at one model's shapes, with Vim's options and layout.

    python -m benchmarks.scan_ratios [--model vim_tiny] [--batch 8] [--rounds 9] [--backends fused torch loop]

Each round times every backend once, in a rotating order (inputs as Vim's mixer hands them over:
channel-last rows; delta_bias, softplus, D, z), float32, under inference mode. Printed: each backend's
median, every ratio to the first backend as a median with the rounds' min-max (the run's own spread), and
the scan's exponential floor: batch x L x D x (N + 2) exps at this machine's cache-resident exp2 rate
(``stm_fast.floor.exp2_rate``). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from stm_fast import ssm
from stm_fast.floor import exp2_rate
from stm_fast.registry import MODEL_CONFIGS

from benchmarks.scan_inputs import channel_last, scan_inputs


def _once(backend, kw):
    t0 = time.perf_counter()
    ssm.selective_scan(**kw, backend=backend)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vim_tiny", choices=sorted(MODEL_CONFIGS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--backends", nargs="+", default=["fused", "torch", "loop"])
    args = ap.parse_args(argv)
    cfg = MODEL_CONFIGS[args.model]
    shape = (args.batch, cfg.d_inner, cfg.num_tokens, cfg.d_state)
    kw = channel_last(scan_inputs(*shape, device="cpu"))
    times = {b: [] for b in args.backends}
    with torch.inference_mode():
        for b in args.backends:
            _once(b, kw)
        for r in range(args.rounds):
            order = args.backends[r % len(args.backends):] + args.backends[:r % len(args.backends)]
            for b in order:
                times[b].append(_once(b, kw))
    first = args.backends[0]
    print(f"scan at {args.model} shapes (batch, D, L, N) = {shape}, float32, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds")
    for b in args.backends:
        ratios = [t / f for t, f in zip(times[b], times[first])]
        print(f"  {b:8s} median {1e3 * statistics.median(times[b]):8.2f} ms   {b} / {first}: "
              f"{statistics.median(ratios):6.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
    rate, what = exp2_rate()
    exps = args.batch * cfg.num_tokens * cfg.d_inner * (cfg.d_state + 2)
    print(f"  exp floor: {exps / 1e6:.1f} M exps at {rate / 1e9:.2f} G/s ({what}) = {1e3 * exps / rate:.2f} ms; "
          f"{first} / floor = {statistics.median(times[first]) * rate / exps:.2f}")


if __name__ == "__main__":
    main()
