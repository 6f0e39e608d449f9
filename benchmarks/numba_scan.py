"""The fused kernel's alternative, measured: the same one-pass scan written with numba, against ``fused``.

    python -m benchmarks.numba_scan [--model vim_tiny] [--batch 8] [--rounds 21]

numba is not a dependency of this package (``pip install numba`` to run this). The numba version is the
fused kernel's loop nest as plain Python (per image and block of channels in parallel, per step: softplus,
exp, the state update, the readout, D and the gate), compiled with ``parallel=True, fastmath=True`` for
this CPU, on Vim's channel-last rows. Printed: numba's compile time, its largest difference to ``fused``,
and both medians with the ratio from one interleaved run (its min-max: the run's own spread). docs/performance.md's
choice of C++ over numba rests on these numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from stm_fast import ssm
from stm_fast.registry import MODEL_CONFIGS

from benchmarks.scan_inputs import channel_last, scan_inputs

BLOCK = 64  # channels per parallel task, as the fused kernel blocks them


def _numba_scan():
    import numba

    @numba.njit(parallel=True, fastmath=True, cache=False)
    def scan(u, delta, z, B, C, A_t, Dskip, bias, y):
        """u, delta, z, y: (batch, L, D); B, C: (batch, L, N); A_t: (N, D)."""
        batch, L, D = u.shape
        N = A_t.shape[0]
        blocks = (D + BLOCK - 1) // BLOCK
        for task in numba.prange(batch * blocks):
            b, d0 = task // blocks, (task % blocks) * BLOCK
            d1 = min(d0 + BLOCK, D)
            w = d1 - d0
            h = np.zeros((N, w), dtype=np.float32)
            dt = np.empty(w, dtype=np.float32)
            du = np.empty(w, dtype=np.float32)
            acc = np.empty(w, dtype=np.float32)
            for t in range(L):
                for j in range(w):  # the inner loops run along contiguous channels: SIMD lanes, as in C++
                    x = delta[b, t, d0 + j] + bias[d0 + j]
                    dt[j] = x if x > 20.0 else np.log1p(np.exp(x))
                    du[j] = dt[j] * u[b, t, d0 + j]
                    acc[j] = 0.0
                for n in range(N):
                    bn, cn = B[b, t, n], C[b, t, n]
                    for j in range(w):
                        h[n, j] = np.exp(dt[j] * A_t[n, d0 + j]) * h[n, j] + bn * du[j]
                        acc[j] += cn * h[n, j]
                for j in range(w):
                    g = z[b, t, d0 + j]
                    y[b, t, d0 + j] = (acc[j] + Dskip[d0 + j] * u[b, t, d0 + j]) * g / (1.0 + np.exp(-g))
    return scan


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vim_tiny", choices=sorted(MODEL_CONFIGS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args(argv)
    cfg = MODEL_CONFIGS[args.model]
    kw = channel_last(scan_inputs(args.batch, cfg.d_inner, cfg.num_tokens, cfg.d_state, device="cpu"))
    rows = {k: kw[k].transpose(1, 2).numpy() for k in ("u", "delta", "z", "B", "C")}  # contiguous rows
    A_t, Dskip, bias = (np.ascontiguousarray(kw[k].numpy().T if k == "A" else kw[k].numpy()) for k in ("A", "D", "delta_bias"))
    y = np.empty_like(rows["u"])
    scan = _numba_scan()
    args_nb = (rows["u"], rows["delta"], rows["z"], rows["B"], rows["C"], A_t, Dskip, bias, y)
    t0 = time.perf_counter()
    scan(*args_nb)
    compile_s = time.perf_counter() - t0
    with torch.inference_mode():
        ref = ssm.selective_scan(**kw, backend="fused")
        err = float((torch.from_numpy(y).transpose(1, 2) - ref).abs().max() / ref.abs().max())
        times = {"fused": [], "numba": []}
        for r in range(args.rounds):
            for name in (("fused", "numba") if r % 2 == 0 else ("numba", "fused")):
                t0 = time.perf_counter()
                ssm.selective_scan(**kw, backend="fused") if name == "fused" else scan(*args_nb)
                times[name].append(time.perf_counter() - t0)
    ratios = [n / f for n, f in zip(times["numba"], times["fused"])]
    print(f"scan at {args.model} shapes, batch {args.batch}, float32, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds; numba compile (first call) {compile_s:.1f} s; numba vs fused max |dy| / max |y| = {err:.1e}")
    print(f"  fused {1e3 * statistics.median(times['fused']):.2f} ms, numba {1e3 * statistics.median(times['numba']):.2f} ms,"
          f" numba / fused {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
