"""Selective-scan backends at Vim-Ti / Vim-S shapes (batch 8, L = 197, N = 16; D = d_inner = 384 / 768).

`loop` (one Python step per token, the layout of mamba-ssm's selective_scan_ref) is the naive floor.
Run: python -m pytest benchmarks/bench_scan.py --benchmark-only
"""

import pytest
import torch

from stm_fast import ssm
from stm_fast.runtime import synchronize

from benchmarks.scan_inputs import channel_last, scan_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = {"vim_tiny": (8, 384, 197, 16), "vim_small": (8, 768, 197, 16)}


def _run(backend, kw):
    y = ssm.selective_scan(**kw, backend=backend)
    synchronize(y.device)
    return y


@pytest.mark.parametrize("layout", ["contiguous", "channel_last"])
@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize("backend", [b for b in ssm.available_backends(DEVICE) if not (b == "triton" and DEVICE == "cpu")])
def test_scan_backend(benchmark, backend, model, layout):
    """``contiguous``: (batch, D, L) inputs as mamba-ssm documents them; ``channel_last``: as Vim's mixer makes them."""
    if backend == "loop" and model == "vim_small" and DEVICE == "cpu":
        pytest.skip("the naive floor is measured at Vim-Ti shapes only, to keep the suite short")
    kw = scan_inputs(*SHAPES[model], device=DEVICE)
    if layout == "channel_last":
        kw = channel_last(kw)
    benchmark.group = f"scan {model} {layout} {DEVICE}"
    benchmark.extra_info.update(backend=backend, shape=SHAPES[model], layout=layout)
    with torch.inference_mode():
        _run(backend, kw)  # warm-up (allocations, kernel compilation)
        y = benchmark(_run, backend, kw)
    assert torch.isfinite(y).all()
