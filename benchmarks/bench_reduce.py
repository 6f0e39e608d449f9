"""Cost of the reduction step alone (selection + merge/prune) at Vim-Ti shapes, per method, at 40%.

The inputs of the first reduction step of a real forward (batch 8 on CPU, 256 on CUDA) are captured and
the step is timed on fresh copies of them each round (steps merge into the token stream in place and
STM consumes the scan's exported first steps), copies made outside the timing. This is the step on warm
caches; ``python -m stm_fast.bench`` reports the step's cost inside real forwards (step ms, step share).
Run: python -m pytest benchmarks/bench_reduce.py --benchmark-only
"""

import pytest
import torch

import stm_fast

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = 256 if DEVICE == "cuda" else 8


def _captured_step(method, rate=0.4):
    torch.manual_seed(0)
    model = stm_fast.create_model("vim_tiny", device=DEVICE)
    stm_fast.reduce(model, method, rate=rate)
    red = model.reducer
    real, captured = red.step, []

    def grab(*args):
        captured.append(args)
        return real(*args)

    red.step = grab
    x = torch.randn(BATCH, 3, 224, 224, device=DEVICE)
    layers = model.layers
    try:
        with torch.inference_mode():
            model(x)
    finally:
        red.step = real
    i, k, x, state, stats = captured[0]
    # the statistics must outlive the forward: keep them
    return red, (i, k, x, state, stats), sum(model.reduction["schedule"]), len(captured), layers


@pytest.mark.parametrize("method", ["stm", "tome", "top", "evit"])
def test_reduction_step(benchmark, method):
    red, args, removed, steps, _ = _captured_step(method)
    benchmark.group = f"reduction step at 40%, vim_tiny, batch {BATCH}, {DEVICE}"
    benchmark.extra_info.update(tokens_removed_in_total=removed, steps_per_forward=steps, k_first_step=args[1])

    def fresh():
        i, k, x, state, stats = args
        with torch.inference_mode():
            if stats and "heads" in stats:
                stats = dict(stats, heads=tuple(None if h is None else h.clone() for h in stats["heads"]))
            return (i, k, x.clone(), state, stats), {}

    def run(*a):
        with torch.inference_mode():
            out = red.step(*a)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    x, state = run(*fresh()[0])
    assert x.shape[1] == args[2].shape[1] - args[1]
    benchmark.pedantic(run, setup=fresh, rounds=200 if DEVICE == "cpu" else 50, warmup_rounds=3)
