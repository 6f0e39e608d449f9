"""stm_fast.ssm backends (kernels in stm_fast.ops) against the float64 reference ``stm_ref.ssm.selective_scan`` (mamba-ssm semantics)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from stm_fast import ssm as fast
from stm_fast.ops import scan_fused as fused_kernel
from stm_fast.ops import scan_torch
from stm_fast.ops.scan_torch import _Export
from stm_fast.ops.conv import causal_conv1d
from stm_fast.runtime import flush_denormals
from stm_ref import ssm, vim as ref_vim

BACKENDS = fast.available_backends("cuda" if torch.cuda.is_available() else "cpu")
CPU_BACKENDS = [b for b in fast.available_backends("cpu")]


@st.composite
def scan_inputs(draw, max_L=48):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch, D, N, L = draw(st.integers(1, 3)), draw(st.integers(1, 8)), draw(st.integers(1, 16)), draw(st.integers(1, max_L))
    layout = draw(st.sampled_from(["variable", "fixed", "grouped"]))
    u = rng.standard_normal((batch, D, L))
    delta = rng.uniform(-5, 1.5, (batch, D, L))  # pre-softplus, as Vim feeds it
    A = -np.exp(rng.uniform(np.log(1e-2), np.log(20), (D, N)))
    if layout == "variable":
        B, C = rng.standard_normal((batch, N, L)), rng.standard_normal((batch, N, L))
    elif layout == "fixed":
        B, C = rng.standard_normal((D, N)), rng.standard_normal((D, N))
    else:
        G = draw(st.sampled_from([g for g in range(1, D + 1) if D % g == 0]))
        B, C = rng.standard_normal((batch, G, N, L)), rng.standard_normal((batch, G, N, L))
    kw = dict(u=u, delta=delta, A=A, B=B, C=C,
              D=rng.standard_normal(D) if draw(st.booleans()) else None,
              z=rng.standard_normal((batch, D, L)) if draw(st.booleans()) else None,
              delta_bias=rng.uniform(-1, 1, D) if draw(st.booleans()) else None,
              delta_softplus=True)
    return kw


def channel_last(t):
    """The same (batch, D, L) values held as (batch, L, D) in memory, as Vim's projections produce them."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _torch(kw, dtype, layout="contiguous"):
    out = {k: (torch.as_tensor(v, dtype=dtype) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    if layout == "channel_last":
        out.update({k: channel_last(out[k]) for k in ("u", "delta", "z", "B", "C") if out[k] is not None and out[k].dim() >= 3})
    return out


@pytest.mark.parametrize("layout", ["contiguous", "channel_last"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=15)
@given(kw=scan_inputs())
def test_backend_matches_float64_reference(backend, layout, kw):
    """float64: every CPU backend equals stm_ref.ssm.selective_scan to 1e-11 (same maths, other summation order),
    whether the inputs are (batch, D, L)-contiguous or channel-last in memory (how Vim's mixer calls it)."""
    ref, ref_last = ssm.selective_scan(**kw, return_last_state=True)
    y, last = fast.selective_scan(**_torch(kw, torch.float64, layout), return_last_state=True, backend=backend)
    scale = 1 + np.abs(ref).max()
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-11, atol=1e-11 * scale)
    np.testing.assert_allclose(last.numpy(), ref_last, rtol=1e-11, atol=1e-11 * (1 + np.abs(ref_last).max()))
    if backend == "torch" and min(y.shape[1:]) > 1:  # y comes back in u's memory layout
        assert (y.stride(1) == 1) == (layout == "channel_last"), y.stride()


@pytest.mark.parametrize("cl_keys", [("u",), ("delta",), ("z",), ("u", "z"), ("delta", "B", "C")])
def test_torch_backend_with_mixed_memory_layouts(cl_keys):
    """Any mix of channel-last and contiguous inputs gives the float64 reference result (only speed differs)."""
    rng = np.random.default_rng(len(cl_keys))
    kw = dict(u=rng.standard_normal((2, 6, 23)), delta=rng.uniform(-4, 1, (2, 6, 23)), A=-rng.uniform(0.1, 9, (6, 5)),
              B=rng.standard_normal((2, 5, 23)), C=rng.standard_normal((2, 5, 23)), D=rng.standard_normal(6),
              z=rng.standard_normal((2, 6, 23)), delta_bias=rng.uniform(-1, 1, 6), delta_softplus=True)
    ref, ref_last = ssm.selective_scan(**kw, return_last_state=True)
    t = _torch(kw, torch.float64)
    t.update({k: channel_last(t[k]) for k in cl_keys})
    y, last = fast.selective_scan(**t, return_last_state=True, backend="torch")
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-11, atol=1e-11 * (1 + np.abs(ref).max()))
    np.testing.assert_allclose(last.numpy(), ref_last, rtol=1e-11, atol=1e-11 * (1 + np.abs(ref_last).max()))


@pytest.mark.parametrize("backend", ["torch", "loop"])
@settings(max_examples=15)
@given(kw=scan_inputs())
def test_float32_backend_is_within_float32_roundoff(backend, kw):
    """float32 inputs: |y - y_ref| <= 2e-5 * (1 + max|y_ref|), i.e. L-step accumulation of float32 rounding."""
    ref = ssm.selective_scan(**kw)
    y = fast.selective_scan(**_torch(kw, torch.float32), backend=backend)
    assert y.dtype == torch.float32
    np.testing.assert_allclose(y.double().numpy(), ref, rtol=0, atol=2e-5 * (1 + np.abs(ref).max()))


@pytest.mark.parametrize("mode", ["sequential", "doubling"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 7, 64])
def test_torch_backend_is_exact_for_any_chunk(chunk, mode):
    """Both in-chunk recurrences give the reference result whatever the chunk length (incl. L not a multiple)."""
    rng = np.random.default_rng(chunk)
    u, delta = (torch.as_tensor(rng.uniform(0.01, 1, (2, 5, 37))) for _ in range(2))
    A = -torch.as_tensor(rng.uniform(0.1, 10, (5, 16)))
    B, C = (torch.as_tensor(rng.standard_normal((2, 16, 37))) for _ in range(2))
    ref = ssm.selective_scan(u.numpy(), delta.numpy(), A.numpy(), B.numpy(), C.numpy())
    y, last = scan_torch.scan_inference(u, delta, A, B, C, chunk=chunk, mode=mode)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())


def test_strong_decay_does_not_overflow_float32():
    """docs/conventions.md §10: the trap: A = -16, delta ~ 0.35 over many steps; a log-space cumsum would overflow float32 here."""
    u = torch.ones(1, 2, 200)
    delta = torch.full((1, 2, 200), 0.35)
    A = torch.full((2, 16), -16.0)
    B = torch.ones(1, 16, 200)
    C = torch.ones(1, 16, 200)
    y = fast.selective_scan(u, delta, A, B, C, backend="torch")
    ref = ssm.selective_scan(u.double().numpy(), delta.double().numpy(), A.double().numpy(), B.double().numpy(), C.double().numpy())
    assert torch.isfinite(y).all()
    np.testing.assert_allclose(y.double().numpy(), ref, rtol=1e-5)


def test_torch_backend_gradients_match_finite_differences():
    """The torch backend is differentiable (training the embedded models needs it): gradcheck in float64."""
    torch.manual_seed(0)
    u = torch.randn(1, 3, 9, dtype=torch.float64, requires_grad=True)
    delta = torch.rand(1, 3, 9, dtype=torch.float64, requires_grad=True)
    A = (-torch.rand(3, 4, dtype=torch.float64) * 3).requires_grad_()
    B = torch.randn(1, 4, 9, dtype=torch.float64, requires_grad=True)
    C = torch.randn(1, 4, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: fast.selective_scan(*a, delta_softplus=True, backend="torch"), (u, delta, A, B, C))


def test_bfloat16_inputs_compute_in_float32_and_return_bfloat16():
    rng = np.random.default_rng(3)
    kw = dict(u=rng.standard_normal((2, 4, 20)), delta=rng.uniform(-4, 1, (2, 4, 20)), A=-rng.uniform(0.5, 8, (4, 16)),
              B=rng.standard_normal((2, 16, 20)), C=rng.standard_normal((2, 16, 20)), delta_softplus=True)
    ref = ssm.selective_scan(**kw)
    y = fast.selective_scan(**{k: torch.as_tensor(v, dtype=torch.bfloat16) if isinstance(v, np.ndarray) else v for k, v in kw.items()})
    assert y.dtype == torch.bfloat16
    # inputs rounded to bf16 (8 bits of mantissa): a few percent of the output scale
    np.testing.assert_allclose(y.double().numpy(), ref, rtol=0, atol=5e-2 * np.abs(ref).max())


def test_backend_choice_and_errors(monkeypatch):
    fused = fused_kernel.available()[0]
    assert fast.resolve_backend(None, "cpu") == ("fused" if fused else "torch"), "the fused kernel when it builds"
    assert fast.resolve_backend(None, "cpu", needs_grad=True) == ("fused" if fused else "torch"), \
        "gradients go through the fused training kernel when it builds"
    with pytest.raises(fast.BackendUnavailable, match="'fused' cannot run on meta: it needs a CPU device"):
        fast.resolve_backend("fused", "meta")
    monkeypatch.setenv("STM_SCAN_BACKEND", "torch")
    assert fast.resolve_backend(None, "cpu") == "torch", "STM_SCAN_BACKEND=torch turns the fused kernel off"
    monkeypatch.setenv("STM_SCAN_BACKEND", "loop")
    assert fast.resolve_backend(None, "cpu") == "loop"
    assert fast.resolve_backend("torch", "cpu") == "torch", "an explicit argument beats the environment"
    monkeypatch.setenv("STM_SCAN_BACKEND", "cuda_magic")
    with pytest.raises(ValueError, match="unknown scan backend 'cuda_magic'"):
        fast.resolve_backend(None, "cpu")
    monkeypatch.delenv("STM_SCAN_BACKEND")
    with pytest.raises(fast.BackendUnavailable, match="needs a CUDA device"):
        fast.resolve_backend("mamba_ssm", "cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(fast.BackendUnavailable, match="triton"):
        fast.resolve_backend("triton", "cpu")


def test_bad_shapes_are_clear_errors():
    u = torch.zeros(1, 4, 5)
    with pytest.raises(ValueError, match="does not match D=4"):
        fast.selective_scan(u, u, -torch.ones(3, 2), torch.zeros(1, 2, 5), torch.zeros(1, 2, 5))
    with pytest.raises(ValueError, match="B of shape"):
        fast.selective_scan(u, u, -torch.ones(4, 2), torch.zeros(1, 3, 5), torch.zeros(1, 2, 5))


@pytest.mark.parametrize("layout", ["contiguous", "channel_last"])
@given(seed=st.integers(0, 2**32 - 1), E=st.integers(1, 8), L=st.integers(1, 30), K=st.integers(1, 5))
def test_causal_conv_matches_reference(layout, seed, E, L, K):
    """Causal depthwise conv + SiLU equals stm_ref.vim.causal_conv1d (explicit tap sum) in float64, through
    conv1d for contiguous inputs and through shifted multiply-adds for channel-last ones."""
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal((2, E, L)), rng.standard_normal((E, 1, K)), rng.standard_normal(E)
    xt = torch.as_tensor(x) if layout == "contiguous" else channel_last(torch.as_tensor(x))
    y = causal_conv1d(xt, torch.as_tensor(w), torch.as_tensor(b))
    assert y.stride(1) == 1 or layout == "contiguous" or E == 1, "the channel-last path keeps its layout"
    y = y.numpy()
    for i in range(2):
        expected = ssm.silu(ref_vim.causal_conv1d(x[i], w, b))
        np.testing.assert_allclose(y[i], expected, rtol=1e-12, atol=1e-12)


def test_channel_last_conv_gradients_equal_conv1d_gradients():
    """Training through the shifted multiply-adds gives conv1d's gradients (x, weight, bias), float64."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 11, dtype=torch.float64)
    w, b = torch.randn(6, 1, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    grads = []
    for xin in (x.clone(), channel_last(x)):
        leaves = [xin.requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
        causal_conv1d(*leaves).pow(2).sum().backward()
        grads.append([t.grad for t in leaves])
    for g_conv, g_taps in zip(*grads):
        torch.testing.assert_close(g_taps, g_conv, rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "loop"])
@pytest.mark.parametrize("L", [1, 197, 730])
@pytest.mark.parametrize("D", [37, 64])  # 37: a tail in every channel block
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("layout", ["contiguous", "channel_last"])
@pytest.mark.parametrize("scaled", [False, True])
def test_cuda_backends_match_reference(backend, L, D, dtype, layout, scaled):
    """On CUDA, every backend that runs here against the float64 reference: tails in D and L, bf16 inputs,
    float64 (where the backend computes it), channel-last inputs, decay_scale, the last state."""
    if dtype == "fp64" and backend == "mamba_ssm" or scaled and backend == "mamba_ssm":
        pytest.skip("mamba-ssm's kernel has no float64 and no decay_scale (the automatic choice skips it then)")
    rng = np.random.default_rng(L + D)
    kw = dict(u=rng.standard_normal((3, D, L)), delta=rng.uniform(-5, 1, (3, D, L)), A=-rng.uniform(0.5, 16, (D, 16)),
              B=rng.standard_normal((3, 16, L)), C=rng.standard_normal((3, 16, L)), D=rng.standard_normal(D),
              z=rng.standard_normal((3, D, L)), delta_bias=rng.uniform(-1, 1, D), delta_softplus=True)
    scale = rng.integers(1, 4, (3, L)).astype(float) if scaled else None
    ref, ref_last = ssm.selective_scan(**kw, decay_scale=scale, return_last_state=True)
    t = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[dtype]
    args = {k: (torch.as_tensor(v, dtype=t if k not in ("A", "D", "delta_bias") or dtype == "fp64" else torch.float32,
                                device="cuda") if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    if layout == "channel_last":
        args.update({k: channel_last(args[k]) for k in ("u", "delta", "z", "B", "C")})
    sc = None if scale is None else torch.as_tensor(scale, dtype=torch.float32, device="cuda")
    y, last = fast.selective_scan(**args, backend=backend, decay_scale=sc, return_last_state=True)
    if dtype == "bf16":  # the inputs themselves are rounded to bf16: compare against the torch backend on them
        want, want_last = fast.selective_scan(**{k: (v.float() if torch.is_tensor(v) else v) for k, v in args.items()},
                                              backend="torch", decay_scale=sc, return_last_state=True)
        ref, ref_last = want.double().cpu().numpy(), want_last.double().cpu().numpy()
    tol = {"fp32": 1e-4, "bf16": 3e-2, "fp64": 1e-10}[dtype]
    np.testing.assert_allclose(y.double().cpu().numpy(), ref, rtol=0, atol=tol * (1 + np.abs(ref).max()))
    np.testing.assert_allclose(last.double().cpu().numpy(), ref_last, rtol=0, atol=tol * (1 + np.abs(ref_last).max()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=8)
@given(kw=scan_inputs(), seed=st.integers(0, 1000))
def test_decay_scale_matches_reference(backend, kw, seed):
    """Pruned-sequence alignment: Abar = exp(scale * delta * A), Bbar = delta * B, as stm_ref.ssm.selective_scan."""
    scale = np.random.default_rng(seed).integers(1, 4, (kw["u"].shape[0], kw["u"].shape[2])).astype(float)
    ref = ssm.selective_scan(**kw, decay_scale=scale)
    y = fast.selective_scan(**_torch(kw, torch.float64), decay_scale=torch.as_tensor(scale), backend=backend)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-11, atol=1e-11 * (1 + np.abs(ref).max()))
    if kw["u"].shape[2] > 2 and np.all(scale[:, 1:] > 1):
        assert not np.allclose(ref, ssm.selective_scan(**kw), rtol=1e-9, atol=1e-12), "the scale must matter"


@settings(max_examples=10)
@given(kw=scan_inputs(max_L=24))
def test_handwritten_backward_matches_autograd_through_the_loop(kw):
    """The torch backend's reverse-scan backward equals autograd through the per-step loop, every layout (float64)."""
    def grads(backend):
        t = _torch(kw, torch.float64)
        leaves = [t[k].requires_grad_() for k in ("u", "delta", "A", "B", "C")]
        y = fast.selective_scan(**t, backend=backend)
        w = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
        return torch.autograd.grad((y * w).sum(), leaves)

    for g_fast, g_loop in zip(grads("torch"), grads("loop")):
        torch.testing.assert_close(g_fast, g_loop, rtol=1e-10, atol=1e-10)


def test_flush_denormals_is_scoped():
    """Flushing subnormals (used by eval/train/bench) must not leak into the rest of the process."""
    tiny = torch.tensor([1e-39])
    assert float(tiny * 1.0) > 0
    with flush_denormals():
        assert float(torch.tensor([1e-39]) * 1.0) == 0.0
    assert float(tiny * 1.0) > 0


@pytest.mark.parametrize("mode", ["sequential", "doubling"])
@settings(max_examples=12)
@given(kw=scan_inputs(max_L=40), n=st.integers(1, 40))
def test_exported_first_steps_are_the_scans_own_delta_abar_and_B(kw, n, mode):
    """``first_steps``: the first n steps' softplus(delta + bias), exp(delta*A) and B, time-major, exactly as
    the scan uses them (float64 vs the reference's discretisation); exporting changes y only by the last-bit
    differences of evaluating exp in two calls; nothing is exported when n exceeds the first chunk or
    the sequence."""
    t = _torch(kw, torch.float64)
    L = t["u"].shape[2]
    out = fast.scan_steps(**t, backend="torch", first_steps=n)
    y, first = out.y, out.first
    plain = fast.selective_scan(**t, backend="torch").numpy()
    np.testing.assert_allclose(y.numpy(), plain, rtol=1e-13, atol=1e-13 * (1 + np.abs(plain).max()))
    if n > min(scan_torch.CHUNK, L):
        assert first is None
        return
    d = kw["delta"] + (kw["delta_bias"][None, :, None] if kw["delta_bias"] is not None else 0)
    d = np.where(d > 20, d, np.log1p(np.exp(d)))  # (batch, D, L)
    np.testing.assert_allclose(first.delta.numpy(), d[:, :, :n].transpose(2, 0, 1), rtol=1e-14)
    abar = np.exp(d[:, :, :n, None] * kw["A"][None, :, None, :])  # (batch, D, n, N)
    np.testing.assert_allclose(first.Abar.numpy(), abar.transpose(2, 0, 3, 1), rtol=1e-13, atol=1e-300)
    if kw["B"].ndim == 3:
        np.testing.assert_array_equal(first.B.numpy(), kw["B"][:, :, :n].transpose(2, 0, 1))
    else:
        assert first.B is None
    with torch.no_grad():
        y2, _ = scan_torch.scan_inference(t["u"], t["delta"], t["A"], t["B"], t["C"], mode=mode, delta_bias=t["delta_bias"],
                                          delta_softplus=True, D=t["D"], z=t["z"], first_steps=_Export(n))
    np.testing.assert_allclose(y2.numpy(), y.numpy(), rtol=1e-12, atol=1e-12 * (1 + np.abs(y.numpy()).max()))


def test_first_steps_are_not_exported_with_decay_scale_or_by_other_backends():
    rng = np.random.default_rng(0)
    u, delta = (torch.as_tensor(rng.uniform(0.01, 1, (2, 5, 9))) for _ in range(2))
    A = -torch.as_tensor(rng.uniform(0.1, 10, (5, 4)))
    B, C = (torch.as_tensor(rng.standard_normal((2, 4, 9))) for _ in range(2))
    for kw in (dict(backend="torch", decay_scale=torch.full((2, 9), 2.0, dtype=torch.float64)), dict(backend="loop")):
        assert fast.scan_steps(u, delta, A, B, C, first_steps=3, **kw).first is None


def test_scratch_buffers_survive_switching_between_inference_mode_and_no_grad():
    """The scan's reused buffers are kept per inference-mode state: tensors created under inference_mode
    cannot be written outside it (a RuntimeError torch raises), so one cache for both would break."""
    rng = np.random.default_rng(1)
    args = [torch.as_tensor(rng.standard_normal(s), dtype=torch.float32) for s in ((2, 6, 33), (2, 6, 33))]
    A = -torch.as_tensor(rng.uniform(0.1, 5, (6, 4)), dtype=torch.float32)
    B, C = (torch.as_tensor(rng.standard_normal((2, 4, 33)), dtype=torch.float32) for _ in range(2))
    outs = []
    for ctx in (torch.inference_mode, torch.no_grad, torch.inference_mode, torch.no_grad):
        with ctx():
            outs.append(fast.selective_scan(*args, A, B, C, delta_softplus=True, backend="torch"))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=0, atol=0)
    scan_torch.release_workspace()  # frees them; the next call allocates afresh and computes the same
    with torch.inference_mode():
        again = fast.selective_scan(*args, A, B, C, delta_softplus=True, backend="torch")
    torch.testing.assert_close(again, outs[0], rtol=0, atol=0)


def test_without_a_compiler_the_cpu_path_says_one_line_and_runs_on_torch(tmp_path):
    """A host with no C++ compiler: one line on stderr names why the fused kernel is not used, then the model
    runs on the torch backend and gives the torch backend's logits."""
    code = ("import torch, stm_fast; from stm_fast import ssm; torch.manual_seed(0); "
            "m = stm_fast.create_model('vim_tiny', img_size=8, patch_size=4, embed_dim=8, depth=2, num_classes=3); "
            "x = torch.randn(2, 3, 8, 8); y = m(x); ref = m.set_scan_backend('torch')(x); "
            "print(ssm.resolve_backend(None, 'cpu'), float((y - ref).abs().max()))")
    env = dict(os.environ, CXX="/nonexistent/g++", STM_FUSED_BUILD_DIR=str(tmp_path))
    env.pop("STM_SCAN_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torch", "0.0"]
    said = [line for line in out.stderr.splitlines() if line.startswith("stm_fast:")]
    assert len(said) == 1 and "fused" in said[0] and "/nonexistent/g++" in said[0] and "not found" in said[0], out.stderr


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_reverse_scan_is_the_scan_of_the_flipped_sequence(backend):
    """``reverse=True`` scans t = L-1 .. 0: y equals the float64 reference on time-flipped inputs, flipped
    back, with a decay_scale too; its first steps are those of the flipped scan (the backward direction's)."""
    rng = np.random.default_rng(3)
    kw = dict(u=rng.standard_normal((2, 6, 13)), delta=rng.uniform(-2, 1, (2, 6, 13)), A=-rng.uniform(0.5, 4, (6, 4)),
              B=rng.standard_normal((2, 4, 13)), C=rng.standard_normal((2, 4, 13)), D=rng.standard_normal(6),
              z=rng.standard_normal((2, 6, 13)), delta_bias=rng.standard_normal(6), delta_softplus=True)
    flipped = {k: (v[..., ::-1].copy() if k in ("u", "delta", "B", "C", "z") else v) for k, v in kw.items()}
    want = ssm.selective_scan(**flipped)[..., ::-1]
    t = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    with torch.inference_mode():
        out = fast.scan_steps(**t, backend=backend, reverse=True, first_steps=3)
    y, first = out.y, out.first
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-12, atol=1e-12)
    if first is not None:
        dt = ssm.softplus(flipped["delta"] + kw["delta_bias"][None, :, None])[:, :, :3].transpose(2, 0, 1)
        np.testing.assert_allclose(first.delta.numpy(), dt, rtol=1e-12)
    scale = rng.uniform(0.5, 2, (2, 13))
    d = ssm.softplus(kw["delta"] + kw["delta_bias"][None, :, None])
    plain = {k: v for k, v in kw.items() if k not in ("delta", "delta_bias", "delta_softplus")}
    want = ssm.selective_scan(**{k: (v[..., ::-1].copy() if k in ("u", "B", "C", "z") else v) for k, v in plain.items()},
                              delta=d[..., ::-1].copy(), decay_scale=scale[:, ::-1].copy())[..., ::-1]
    with torch.inference_mode():
        y = fast.selective_scan(**{k: torch.as_tensor(v) for k, v in plain.items()}, delta=torch.as_tensor(d),
                                decay_scale=torch.as_tensor(scale), backend=backend, reverse=True)
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-12, atol=1e-12)
