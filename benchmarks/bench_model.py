"""Vision Mamba forward throughput (images/s), random inputs, warm-up excluded.

CPU: float32, batch 8. CUDA (when present): batch 256, float32 and bf16 autocast.
Run: python -m pytest benchmarks/bench_model.py --benchmark-only
"""

import pytest
import torch

import stm_fast
from stm_fast.runtime import synchronize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = 256 if DEVICE == "cuda" else 8
DTYPES = ["fp32", "bf16"] if DEVICE == "cuda" else ["fp32"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["vim_tiny", "vim_small"])
def test_forward_throughput(benchmark, name, dtype):
    model = stm_fast.create_model(name, device=DEVICE)
    x = torch.randn(BATCH, 3, 224, 224, device=DEVICE)

    def run():
        with torch.inference_mode(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            y = model(x)
        synchronize(torch.device(DEVICE))
        return y

    run()  # warm-up
    benchmark.group = f"forward {DEVICE} batch {BATCH}"
    y = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.median if benchmark.stats else None
    assert y.shape == (BATCH, 1000)
