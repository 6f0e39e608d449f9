"""The Triton kernel (``stm_fast.ops.scan_triton``) against the float64 reference: one pass over the inputs.

Runs on CUDA, and on this CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py):
the reverse direction by index arithmetic, the delta bias and softplus in the kernel (torch's softplus,
threshold 20), the D skip, the z gate, decay_scale, every B/C layout (fixed, variable, grouped), channel-last
and strided inputs, bf16/fp16/mixed inputs converted in registers, and the choice of channels per program.
float64 is held to 1e-10 of the reference; float32 (and narrower inputs) to twice the float32 torch
backend's own error on the same inputs.
"""

import os
import sys
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stm_fast import ssm
from stm_fast.ops import backends, scan_triton
from stm_fast.ops.common import ScanCall
from tests.builders import channel_last, flip_time, make_case, reference, rel_err

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs a CUDA device or the Triton interpreter")

LAYOUTS = {  # (b_layout, c_layout, groups) with 6 channels
    "variable": ("variable", "variable", 1),
    "fixed": ("fixed", "fixed", 1),
    "grouped-1": ("grouped", "grouped", 1),
    "grouped-2": ("grouped", "grouped", 2),
    "grouped-6/variable": ("grouped", "variable", 6),
}


def _strided(t):
    """The same values in a non-contiguous view: every other element of a twice-as-long last axis."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


def _memory(kw, how):
    """The call's tensors held contiguous, channel-last (Vim's mixer), or as strided views (A transposed)."""
    out = dict(kw)
    for k, v in kw.items():
        if not torch.is_tensor(v):
            continue
        if how == "channel_last" and k in ("u", "delta", "z") + (("B", "C") if v.dim() >= 3 else ()):
            out[k] = channel_last(v) if v.dim() == 3 else v.transpose(-1, -2).contiguous().transpose(-1, -2)
        elif how == "strided":
            out[k] = v.t().contiguous().t() if k == "A" else _strided(v)
    return out


def _on(kw, device=DEVICE, dtype=None):
    return {k: (v.to(device, dtype if dtype is not None and v.is_floating_point() else v.dtype)
                if torch.is_tensor(v) else v) for k, v in kw.items()}


def _triton(kw, reverse=False, **extra):
    y, last = ssm.selective_scan(**_on(kw), backend="triton", reverse=reverse, return_last_state=True, **extra)
    return y.cpu(), last.cpu()


def test_the_record_says_reverse_by_index_and_the_dtypes_it_takes():
    rec = backends.backend("triton")
    assert rec.reverse == "index"
    assert rec.dtypes == (torch.float32, torch.float64) and rec.decay_scale and not rec.differentiable


@pytest.mark.parametrize("memory", ["contiguous", "channel_last", "strided"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("options", ["all", "bare"])
def test_float64_equals_the_reference(options, reverse, layout, memory):
    """float64: y and the last state equal stm_ref's to 1e-10 (relative to their scale), in both directions,
    with and without bias + softplus, D, z and decay_scale, every B/C layout and memory layout; two blocks of
    4 channels over 6 (the second one half masked)."""
    b_layout, c_layout, groups = LAYOUTS[layout]
    rng = np.random.default_rng(zlib.crc32(f"{options}{reverse}{layout}{memory}".encode()))
    flags = dict(softplus=True, bias=True, skip=True, gate=True, decay=True) if options == "all" else \
        dict(softplus=False, bias=False, skip=False, gate=False, decay=False)
    kw = _memory(make_case(rng, 2, 6, 5, 11, b_layout, c_layout, groups, **flags), memory)
    want, want_last = reference(kw, reverse)
    y, last = scan_triton.selective_scan_triton(**_on(kw), return_last_state=True, block_d=4, reverse=reverse)
    assert y.dtype == last.dtype == torch.float64
    assert rel_err(y.cpu(), want) < 1e-10 and rel_err(last.cpu(), want_last) < 1e-10
    if reverse:  # and the direction matters
        assert rel_err(y.cpu(), reference(kw, False)[0]) > 1e-3


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_through_selective_scan_equals_the_torch_backend_and_the_reference(reverse):
    """The public call (ScanCall -> scan) in both directions: the reference to 1e-10, the torch backend (which
    flips) to 1e-12; channel-last inputs as Vim's mixer passes them; y comes back in u's memory layout."""
    rng = np.random.default_rng(7 + reverse)
    kw = make_case(rng, 3, 8, 16, 20, decay=True, u_cl=True, delta_cl=True, z_cl=True)
    want, want_last = reference(kw, reverse)
    y, last = _triton(kw, reverse)
    y_torch, last_torch = ssm.selective_scan(**kw, backend="torch", reverse=reverse, return_last_state=True)
    assert rel_err(y, want) < 1e-10 and rel_err(last, want_last) < 1e-10
    assert rel_err(y, y_torch.numpy()) < 1e-12 and rel_err(last, last_torch.numpy()) < 1e-12
    assert y.stride(1) == 1  # channel-last, as u


def test_scan_returns_the_last_state_only_when_asked():
    kw = _on(make_case(np.random.default_rng(3), 1, 3, 2, 4))
    call = ScanCall(u=kw["u"], delta=kw["delta"], A=kw["A"], B=kw["B"], C=kw["C"], D=kw["D"], z=kw["z"],
                    delta_bias=kw["delta_bias"], delta_softplus=True, reverse=True, dtype=torch.float64)
    out = scan_triton.scan(call)
    assert out.last is None and out.first is None
    both = scan_triton.scan(replace(call, last_state=True))
    assert torch.equal(both.y, out.y) and both.last.shape == (1, 3, 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_softplus_is_torchs_with_threshold_20(dtype):
    """With L = 1, u = B = C = 1 and no D or z, y = softplus(delta + bias) itself: torch's F.softplus (x where
    x > 20, else log1p(exp(x))) to 2 ulp across the range, far below 0 (where log(1 + exp(x)) would lose
    every digit) and on both sides of the threshold."""
    x = torch.tensor([-700.0, -60.0, -30.0, -17.0, -5.0, -1e-3, 0.0, 1e-8, 0.5, 3.0, 15.0, 19.99, 20.0, 20.001, 25.0,
                      80.0, 200.0], dtype=torch.float64)
    x = x[x > -100] if dtype == torch.float32 else x  # exp underflows float32 below ~-104
    Dm = x.numel()
    bias = torch.linspace(-0.5, 0.5, Dm, dtype=torch.float64)
    ones = torch.ones(1, Dm, 1, dtype=dtype)
    y = scan_triton.selective_scan_triton(ones, (x - bias).to(dtype)[None, :, None], -torch.ones(Dm, 1, dtype=dtype),
                                          torch.ones(1, 1, 1, dtype=dtype), torch.ones(1, 1, 1, dtype=dtype),
                                          delta_bias=bias.to(dtype), delta_softplus=True)
    want = F.softplus((x - bias).to(dtype) + bias.to(dtype))  # the torch backend's arithmetic, same dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y[0, :, 0].cpu(), want, rtol=2 * eps, atol=0)
    if dtype == torch.float64:  # the threshold is strict: softplus(20) = 20 + 2.06e-9, softplus(20.001) = 20.001
        got = dict(zip(x.tolist(), y[0, :, 0].cpu().tolist()))
        assert got[20.0] > 20.0 and got[20.001] == pytest.approx(20.001, abs=1e-14)


def _torch_error(kw, ref_y, reverse=False):
    """The float32 torch backend's own error on these (same-dtype) inputs, relative to the reference's scale
    (a reverse scan as the forward scan of time-flipped copies, which is what that backend runs)."""
    y = ssm.selective_scan(**flip_time(kw), backend="torch").flip(-1) if reverse else \
        ssm.selective_scan(**kw, backend="torch")
    return rel_err(y, ref_y)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("layout", ["variable", "fixed", "grouped-2"])
def test_float32_within_twice_the_torch_backends_error(layout, reverse):
    """float32 inputs: no further from the float64 reference (on the same float32 values) than twice the torch
    backend's own float32 error, plus a floor of 1e-6."""
    b_layout, c_layout, groups = LAYOUTS[layout]
    kw = make_case(np.random.default_rng(11 + reverse), 2, 6, 8, 40, b_layout, c_layout, groups,
                   dtype=torch.float32, decay=True, u_cl=True, delta_cl=True)
    want, want_last = reference(kw, reverse)
    y, last = _triton(kw, reverse)
    assert y.dtype == last.dtype == torch.float32
    assert rel_err(y, want) <= 2 * _torch_error(kw, want, reverse) + 1e-6
    assert rel_err(last, want_last) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_narrow_inputs_compute_in_float32_and_return_u_dtype(dtype, reverse):
    """bf16/fp16 inputs (a float32 compute dtype, which the record takes) are converted in registers: y in
    u's dtype, the last state in float32, both as close to the float64 reference on the same (rounded)
    values as the torch backend, which converts on the host, plus one ulp of y's dtype (Triton's interpreter
    truncates float32 to bf16 where CUDA rounds to nearest: up to one ulp where torch's rounding gives half)."""
    kw = make_case(np.random.default_rng(21 + reverse), 2, 6, 8, 24, "grouped", "variable", 2, decay=True,
                   u_cl=True, z_cl=True)
    kw = {k: (v.to(dtype) if torch.is_tensor(v) else v) for k, v in kw.items()}
    want, want_last = reference(kw, reverse)
    y, last = _triton(kw, reverse)
    assert y.dtype == dtype and last.dtype == torch.float32
    assert rel_err(y, want) <= 2 * _torch_error(kw, want, reverse) + torch.finfo(dtype).eps
    assert rel_err(last, want_last) <= 1e-5


def test_mixed_input_dtypes_compute_in_the_widest():
    """One float64 input among float32/bf16 ones makes the compute float64 (the narrower inputs converted
    exactly in registers) and y keeps u's dtype: the torch backend's result (which converts on the host) to
    float32 rounding (bf16/fp16 u: to one ulp of y); float64 z or D with float32 u, delta, A, B, C compute in
    float32, as torch does."""
    kw = make_case(np.random.default_rng(31), 2, 6, 4, 15, decay=True)
    mixed = dict(kw, u=kw["u"].float(), delta=kw["delta"].bfloat16(), A=kw["A"].float(), C=kw["C"].half())
    y, last = _triton(mixed)
    want, want_last = reference(mixed)
    y_torch = ssm.selective_scan(**mixed, backend="torch")
    assert y.dtype == torch.float32 and last.dtype == torch.float64
    assert rel_err(last, want_last) < 1e-10 and rel_err(y, want) < 1e-7
    torch.testing.assert_close(y, y_torch, rtol=2 ** -23, atol=1e-7)
    for dtype in (torch.bfloat16, torch.float16):  # float64 compute, y rounded to u's narrow dtype via float32
        y = _triton(dict(mixed, u=kw["u"].to(dtype)))[0]
        y_torch = ssm.selective_scan(**dict(mixed, u=kw["u"].to(dtype)), backend="torch")
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), y_torch.float(), rtol=torch.finfo(dtype).eps, atol=1e-6)
    narrow = {k: (v.float() if torch.is_tensor(v) and k not in ("z", "D") else v) for k, v in kw.items()}
    y, last = _triton(narrow)
    assert y.dtype == last.dtype == torch.float32
    assert rel_err(y, reference(narrow)[0]) <= 2 * _torch_error(narrow, reference(narrow)[0]) + 1e-6


def test_one_pass_no_host_side_copies(monkeypatch):
    """Nothing in the module casts, flips, copies or makes contiguous an input, and it allocates y and the
    last state only: every conversion, the bias, softplus and the reverse order are in the kernel."""
    seen = []
    here = scan_triton.__file__

    def spy(owner, name):
        real = getattr(owner, name)

        def wrapper(*a, **k):
            if sys._getframe(1).f_code.co_filename == here:
                seen.append(name)
            return real(*a, **k)
        monkeypatch.setattr(owner, name, wrapper)

    for name in ("to", "float", "double", "half", "bfloat16", "contiguous", "flip", "clone", "copy_",
                 "repeat_interleave", "add", "__add__", "__mul__"):
        spy(torch.Tensor, name)
    for name in ("empty", "empty_like", "flip", "zeros"):
        spy(torch, name)
    spy(F, "softplus")
    kw = make_case(np.random.default_rng(41), 2, 6, 4, 9, "grouped", "fixed", 2, dtype=torch.bfloat16, decay=True)
    scan_triton.selective_scan_triton(**_on(kw), return_last_state=True, reverse=True)
    assert seen == ["empty", "empty"]  # y, the last state


@pytest.mark.parametrize("batch, channels, sms, want", [
    (8, 384, 132, 8),     # Vim-Ti at batch 8 on an H100: 384 programs (32 channels gave 96)
    (1, 384, 132, 4),     # as small as allowed: 96 programs
    (11, 384, 132, 16),   # 264 = 2 * 132 exactly
    (22, 384, 132, 32),   # large batches keep the widest block
    (64, 768, 132, 32),
    (8, 384, 16, 32),     # a small GPU
    (4, 6, 132, 4),       # few channels: the smallest block
    (4, 3, 132, 4),
    (4, 1, 132, 1),       # one channel: a block of one
    (2, 384, None, 32),   # the interpreter: the widest block, no device query
    (2, 6, None, 8),
])
def test_block_d_is_the_widest_that_gives_twice_the_sm_count(batch, channels, sms, want):
    assert scan_triton.block_d_for(batch, channels, sms) == want
    if sms is not None and want > 4:
        assert batch * -(-channels // want) >= 2 * sms
        assert want == 32 or batch * -(-channels // (2 * want)) < 2 * sms


def test_the_launch_uses_block_d_for(monkeypatch):
    """The default launch takes its block from block_d_for (on CUDA with the device's SM count, queried once;
    here the interpreter's None); block_d= overrides it."""
    asked = []
    real = scan_triton.block_d_for
    monkeypatch.setattr(scan_triton, "block_d_for", lambda *a: (asked.append(a), real(*a))[1])
    kw = _on(make_case(np.random.default_rng(5), 3, 6, 4, 5))
    want = scan_triton.selective_scan_triton(**kw)
    sms = scan_triton._sm_count(DEVICE.index or 0) if DEVICE.type == "cuda" else None
    assert asked == [(3, 6, sms)]
    torch.testing.assert_close(scan_triton.selective_scan_triton(**kw, block_d=2), want, rtol=1e-12, atol=1e-12)
    assert len(asked) == 1
    assert [scan_triton._num_warps(b, 16) for b in (1, 2, 4, 8, 32)] == [1, 1, 2, 4, 4]
