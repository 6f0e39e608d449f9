"""The Vim model itself on CUDA, for every CUDA scan backend that runs here, against the float64 reference
(``stm_ref.vim``, NumPy on the CPU): unreduced and with every reduction method.

* float64 (backends that compute it): logits within 1e-9 of the reference's scale;
* float32 with TF32 off: logits no further from the reference than 4x the float32 torch backend's error on
  the CPU plus 1e-5 of the logit scale (the self-check's rule; data-dependent methods can flip a near-tie in
  float32, so this part runs the methods without discrete choices, none and stm);
* fp16 autocast (the anchor protocol's precision): logits within 5e-2 of the scale, every method.

Skipped without a CUDA device (``benchmarks/gpu_check.sh`` runs them on a lent GPU machine); the test ids
name the backend, so the script's closing line can say which backends were certified.
"""

import pytest
import torch

import stm_fast
from stm_fast import ssm
from stm_fast.reduction.base import METHODS
from stm_fast.runtime import tf32_off
from stm_ref import vim as ref_vim
from tests.builders import random_model

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA_BACKENDS = ("torch", "triton", "mamba_ssm")
CASES = [("none", {})] + [(m, {}) for m in sorted(METHODS)] + [
    (m, {"flavour": f}) for m in sorted(METHODS) for f in METHODS[m].flavours]
GEOM = dict(img_size=28, patch_size=2, embed_dim=16, depth=6, d_state=8)  # 197 tokens, as Vim-Ti


def _backend_or_skip(name):
    ok, reason = ssm._works(stm_fast.ops.backends.backend(name), torch.device("cuda")) if torch.cuda.is_available() \
        else (False, "no CUDA device")
    if not ok:
        pytest.skip(f"cuda/{name} does not run here: {reason}")


def _setup(method, options, dtype):
    """(model in ``dtype`` on the CPU, its reduction, images, reference logits)."""
    m = random_model(5, **GEOM, dtype=torch.float64).eval()
    red = stm_fast.make_reduction(m, method, rate=0.2, **options) if method != "none" else None
    x = torch.randn(3, 3, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    want = ref_vim.forward(sd, x.numpy(), reduction=None if red is None else red.to_dict())
    return m.to(dtype), red, x.to(dtype), torch.as_tensor(want)


def _logits(m, red, x, device, backend, precision=None):
    m = m.to(device).set_scan_backend(backend)
    with torch.inference_mode(), stm_fast.reduced(m, red) if red is not None else torch.inference_mode(), \
            torch.autocast("cuda", dtype=precision, enabled=precision is not None):
        return m(x.to(device)).double().cpu()


def _rel(got, want):
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("method,options", CASES, ids=str)
def test_cuda_model_in_float64_equals_the_reference(backend, method, options):
    _backend_or_skip(backend)
    if backend == "mamba_ssm":
        pytest.skip("mamba-ssm's kernel computes no float64")
    m, red, x, want = _setup(method, options, torch.float64)
    assert _rel(_logits(m, red, x, "cuda", backend), want) <= 1e-9


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("method", ["none", "stm"])
def test_cuda_model_in_float32_is_within_the_torch_backends_own_error(backend, method):
    _backend_or_skip(backend)
    m, red, x, want = _setup(method, {}, torch.float32)
    with tf32_off():
        base = _rel(_logits(m, red, x, "cpu", "torch"), want)
        got = _rel(_logits(m, red, x, "cuda", backend), want)
    assert got <= 1e-5 + 4 * base, (got, base)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("method,options", CASES, ids=str)
def test_cuda_model_under_fp16_autocast_stays_close(backend, method, options):
    _backend_or_skip(backend)
    m, red, x, want = _setup(method, options, torch.float32)
    got = _logits(m, red, x, "cuda", backend, torch.float16)
    assert torch.isfinite(got).all() and _rel(got, want) <= 5e-2
