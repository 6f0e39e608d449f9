"""Cost of the reduction step alone (selection + merge/prune) at Vim-Ti shapes, per method, at 40%.

The inputs of the first reduction step of a real forward (batch 8 on CPU, 256 on CUDA) are captured and
the step is timed on fresh copies of them each round (steps merge into the token stream in place and
STM takes over the scan's exported first steps, once: LayerStats.take_first_steps), copies made outside the timing. This is the step on warm
caches; ``python -m stm_fast.bench`` reports the step's cost inside real forwards (step ms, step share).
Run: python -m pytest benchmarks/bench_reduce.py --benchmark-only
"""

from dataclasses import replace

import pytest
import torch

import stm_fast
from stm_fast.ops.common import FirstSteps
from stm_fast.reduction import METHODS
from stm_fast.runtime import synchronize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = 256 if DEVICE == "cuda" else 8


def _captured_step(method, rate=0.4):
    """The reduction, the arguments of its first step in a real forward, tokens removed and steps per forward."""
    torch.manual_seed(0)
    model = stm_fast.create_model("vim_tiny", device=DEVICE)
    reduction = stm_fast.make_reduction(model, method, rate=rate)
    captured = []

    def grab(step, args):  # the step hook sees every step's inputs
        captured.append(args)
        return step(*args)

    x = torch.randn(BATCH, 3, 224, 224, device=DEVICE)
    with stm_fast.reduced(model, reduction.with_step_hook(grab)), torch.inference_mode():
        model(x)
    # the statistics must outlive the forward: keep them
    return reduction.impl, captured[0], sum(reduction.schedule), len(captured)


@pytest.mark.parametrize("method", list(METHODS))  # every registered method
def test_reduction_step(benchmark, method):
    impl, args, removed, steps = _captured_step(method)
    benchmark.group = f"reduction step at 40%, vim_tiny, batch {BATCH}, {DEVICE}"
    benchmark.extra_info.update(tokens_removed_in_total=removed, steps_per_forward=steps, k_first_step=args[1])

    def fresh():
        i, k, x, tokens, stats = args
        with torch.inference_mode():
            if stats is not None and stats.first_pair is not None:  # the step takes them over: a fresh copy per call
                stats = replace(stats, first_pair=tuple(FirstSteps(f.delta.clone(), f.Abar.clone(),
                                                                   None if f.B is None else f.B.clone())
                                                        for f in stats.first_pair))
            return (i, k, x.clone(), tokens, stats), {}

    def run(*a):
        with torch.inference_mode():
            out = impl.step(*a)
        synchronize(torch.device(DEVICE))
        return out

    x, _ = run(*fresh()[0])
    assert x.shape[1] == args[2].shape[1] - args[1]
    benchmark.pedantic(run, setup=fresh, rounds=200 if DEVICE == "cpu" else 50, warmup_rounds=3)
