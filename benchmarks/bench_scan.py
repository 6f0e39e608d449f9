"""Selective-scan backends at Vim-Ti / Vim-S shapes (batch 8, L = 197, N = 16; D = d_inner = 384 / 768).

`loop` (one Python step per token, the layout of mamba-ssm's selective_scan_ref) is the naive floor.
Run: python -m pytest benchmarks/bench_scan.py --benchmark-only
"""

import pytest
import torch

from stm_fast import ssm
from stm_fast.runtime import synchronize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = {"vim_tiny": (8, 384, 197, 16), "vim_small": (8, 768, 197, 16)}


def _inputs(batch, D, L, N, device=DEVICE, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return dict(u=r(batch, D, L), delta=r(batch, D, L) - 3, A=-torch.rand(D, N, generator=g).mul(15).add(1).to(device),
                B=r(batch, N, L), C=r(batch, N, L), D=r(D), z=r(batch, D, L), delta_bias=r(D), delta_softplus=True)


def _run(backend, kw):
    y = ssm.selective_scan(**kw, backend=backend)
    synchronize(y.device)
    return y


def _channel_last(kw):
    """The same values held (batch, L, channels) in memory: how Vim's mixer hands them to the scan."""
    return {k: v.transpose(1, 2).contiguous().transpose(1, 2) if k in ("u", "delta", "z", "B", "C") else v
            for k, v in kw.items()}


@pytest.mark.parametrize("layout", ["contiguous", "channel_last"])
@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize("backend", [b for b in ssm.available_backends(DEVICE) if not (b == "triton" and DEVICE == "cpu")])
def test_scan_backend(benchmark, backend, model, layout):
    """``contiguous``: (batch, D, L) inputs as mamba-ssm documents them; ``channel_last``: as Vim's mixer makes them."""
    if backend == "loop" and model == "vim_small" and DEVICE == "cpu":
        pytest.skip("the naive floor is measured at Vim-Ti shapes only, to keep the suite short")
    kw = _inputs(*SHAPES[model])
    if layout == "channel_last":
        kw = _channel_last(kw)
    benchmark.group = f"scan {model} {layout} {DEVICE}"
    benchmark.extra_info.update(backend=backend, shape=SHAPES[model], layout=layout)
    with torch.inference_mode():
        _run(backend, kw)  # warm-up (allocations, kernel compilation)
        y = benchmark(_run, backend, kw)
    assert torch.isfinite(y).all()
