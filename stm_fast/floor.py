"""How close a CPU forward is to this machine's limit: the floor the bench prints beside its timings.

floor = (time of the forward's matrix products alone) + (the scan's exponentials at this machine's
cache-resident exp2 rate). The matrix products are the model's own linear layers (patch embedding, both
directions' input/x/dt/output projections, head) run on the shapes the forward gives them, without the
scan; the exponential count is what the selective scan cannot avoid: per layer, direction, image, token
and inner channel, one exp per state for Abar = exp(delta*A) (eq. 2) plus one for softplus(delta) and
one for silu(z). The exp2 rate is measured on a buffer that stays in cache, with the threads torch uses, by the fused
kernel's own exp2 (the fastest here) when it builds, else by torch.exp2.
Anything a forward spends above the floor is memory traffic, the convolution, norms and glue.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

__all__ = ["exp_count", "exp2_rate", "linear_pass_seconds", "forward_floor"]

EXP_BUFFER = 1 << 16  # float32 values: 256 KiB in all, each thread's share fits its core's L2


def exp_count(cfg, batch: int) -> int:
    """Exponentials of the unreduced forward's scans: 2 directions x depth x batch x L x E x (N + 2)."""
    return 2 * cfg.depth * batch * cfg.num_tokens * cfg.d_inner * (cfg.d_state + 2)


def _exp2_call(calls: int):
    """A function timing ``calls`` exp2 passes over the buffer, and what computes them: the fused kernel's own
    decay exp2 when it builds here (the scan's exponentials are those), else torch.exp2."""
    x = torch.rand(EXP_BUFFER).mul_(-20)
    out = torch.empty_like(x)
    from .ops import scan_fused

    if scan_fused.available()[0]:
        return (lambda: scan_fused.exp2_decays_into(x, out, calls)), "the fused kernel's exp2"
    return (lambda: [torch.exp2(x, out=out) for _ in range(calls)]), "torch.exp2"


def exp2_rate(repeats: int = 15, calls: int = 40) -> tuple[float, str]:
    """(exp2 evaluations per second on a cache-resident float32 buffer, median over ``repeats``; what ran)."""
    run, what = _exp2_call(calls)
    run()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        rates.append(calls * EXP_BUFFER / (time.perf_counter() - t0))
    return statistics.median(rates), what


def linear_pass_seconds(model, batch: int) -> float:
    """Seconds for one pass of every matrix product of the unreduced forward, on fresh random inputs."""
    cfg = model.cfg
    L, d, E = cfg.num_tokens, cfg.embed_dim, cfg.d_inner
    dtype = model.pos_embed.dtype
    images = torch.randn(batch, cfg.channels, cfg.img_size, cfg.img_size, dtype=dtype)
    hidden = torch.randn(batch, L, d, dtype=dtype)
    inner = torch.randn(batch, L, E, dtype=dtype)
    R = model.layers[0].mixer.dt_rank
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.patch_embed(images)
        for layer in model.layers:
            mix = layer.mixer
            mix.in_proj(hidden)
            for x_proj, dt_proj in ((mix.x_proj, mix.dt_proj), (mix.x_proj_b, mix.dt_proj_b)):
                F.linear(x_proj(inner)[..., :R], dt_proj.weight)
            mix.out_proj(inner)
        model.head(hidden[:, 0])
        return time.perf_counter() - t0


def forward_floor(model, batch: int, matmul_per_round: list[float] | None = None, rounds: int = 7) -> dict:
    """The floor of an unreduced CPU forward of ``model`` at ``batch`` images, and its parts (seconds):
    ``matmul_per_round`` are timings of ``linear_pass_seconds`` taken beside the forwards (a benchmark's
    rounds), else ``rounds`` passes are timed here. ``floor_per_round``: each round's floor."""
    if matmul_per_round is None:
        linear_pass_seconds(model, batch)
        matmul_per_round = [linear_pass_seconds(model, batch) for _ in range(rounds)]
    rate, what = exp2_rate()
    exps = exp_count(model.cfg, batch)
    mm = statistics.median(matmul_per_round)
    return {"matmul_s": mm, "exps": exps, "exp2_per_s": rate, "exp2_by": what, "exp_s": exps / rate,
            "floor_s": mm + exps / rate, "floor_per_round": [m + exps / rate for m in matmul_per_round]}
