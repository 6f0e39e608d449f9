"""The fused CPU selective-scan kernel (stm_fast.ops.scan_fused) against the float64 reference
``stm_ref.ssm.selective_scan`` (eq. 2-3), the torch backend, and its own contracts (layouts, first steps,
errors, the build-failure path). Skipped as a whole when the extension cannot be built here."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import stm_fast
from stm_fast.ops import scan_fused
from stm_ref import ssm as ref
from stm_ref import vim as ref_vim
from tests.builders import channel_last, flip_time, make_case, numpy_args, reference, rel_err

OK, REASON = scan_fused.available()
if not OK:
    pytest.skip(f"fused CPU scan unavailable: {REASON}", allow_module_level=True)

F64_TOL = 1e-12  # relative to 1 + max |reference|
F32_FLOOR = 1e-7  # about one float32 ulp of that scale: the floor of the float32 comparison


@st.composite
def scan_cases(draw):
    widths = st.sampled_from([4, 8, 15, 16, 17, 24, 31, 32, 33, 40])  # around the SIMD widths and blocks
    batch, Dm = draw(st.integers(1, 3)), draw(st.one_of(st.integers(1, 40), widths))
    N, L = draw(st.integers(1, 16)), draw(st.integers(1, 300))
    groups = draw(st.sampled_from([g for g in (1, 2, 3, 4, 5, 8) if Dm % g == 0]))
    layouts = st.sampled_from(["variable", "fixed", "grouped"])
    flags = {k: draw(st.booleans()) for k in ("softplus", "bias", "skip", "gate", "decay", "u_cl", "delta_cl", "z_cl")}
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kw = make_case(rng, batch, Dm, N, L, draw(layouts), draw(layouts), groups, **flags)
    return kw, draw(st.booleans())


@settings(max_examples=60)
@given(scan_cases())
def test_float64_matches_reference(case):
    kw, reverse = case
    y, last = scan_fused.selective_scan_fused(**kw, return_last_state=True, reverse=reverse)
    y_ref, last_ref = reference(kw, reverse)
    assert y.dtype == last.dtype == torch.float64
    assert rel_err(y, y_ref) <= F64_TOL
    assert rel_err(last, last_ref) <= F64_TOL


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("batch,Dm,N,L", [(2, 384, 16, 197), (3, 37, 5, 300), (1, 9, 16, 64)])
def test_float32_error_is_that_of_the_torch_backend(batch, Dm, N, L, reverse):
    """float32, Vim's options and layouts: the fused error vs float64 is at most 2x the torch backend's + ~1 ulp."""
    kw = make_case(np.random.default_rng(Dm), batch, Dm, N, L, dtype=torch.float32, u_cl=True, delta_cl=True, z_cl=True)
    kw["C"] = channel_last(kw["C"])
    y_ref, last_ref = reference(kw, reverse)
    with torch.inference_mode():
        y, last = scan_fused.selective_scan_fused(**kw, return_last_state=True, reverse=reverse)
        torch_kw = flip_time(kw) if reverse else kw
        y_t, last_t = stm_fast.selective_scan(**torch_kw, return_last_state=True, backend="torch")
    y_t = y_t.flip(-1) if reverse else y_t
    assert y.dtype == last.dtype == torch.float32
    assert rel_err(y, y_ref) <= 2 * rel_err(y_t, y_ref) + F32_FLOOR
    assert rel_err(last, last_ref) <= 2 * rel_err(last_t, last_ref) + F32_FLOOR
    assert rel_err(y, y_ref) < 1e-6  # and, as a figure: both stay at a few float32 ulps


@settings(max_examples=25)
@given(scan_cases())
def test_float32_hypothesis_against_reference(case):
    kw, reverse = case
    kw32 = {k: (v.float() if torch.is_tensor(v) else v) for k, v in kw.items()}
    y, last = scan_fused.selective_scan_fused(**kw32, return_last_state=True, reverse=reverse)
    y_ref, last_ref = reference(kw32, reverse)
    assert rel_err(y, y_ref) <= 2e-6 and rel_err(last, last_ref) <= 2e-6


def test_float32_large_decay_arguments_take_the_clamped_path():
    """|delta * A| far beyond float32's exponent range: decays that underflow (and, with negative delta,
    growth) must still match the reference where it is representable."""
    rng = np.random.default_rng(1)
    kw = make_case(rng, 2, 24, 8, 40, dtype=torch.float32, softplus=False, gate=False)
    kw["A"] = kw["A"] * 60  # dt * A down to about -240: 2^-346, far below float32's smallest normal
    y, last = scan_fused.selective_scan_fused(**kw, return_last_state=True)
    y_ref, last_ref = reference(kw)
    assert rel_err(y, y_ref) < 2e-6 and rel_err(last, last_ref) < 2e-6


def test_nan_in_A_propagates():
    kw = make_case(np.random.default_rng(2), 1, 10, 4, 12, dtype=torch.float32, gate=False, skip=False)
    kw["A"][3, 1] = float("nan")
    y = scan_fused.selective_scan_fused(**kw)
    assert torch.isnan(y[:, 3]).all() and torch.isfinite(y[:, :3]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reverse", [False, True])
def test_first_steps_are_the_scan_steps(dtype, reverse):
    """delta_out = softplus(delta + bias), Abar_out = exp(delta A) as (N, D) per batch item, B_out = B_t, for
    the first n steps in scan order, written into strided views (as the mixer hands them over)."""
    batch, Dm, N, L, n = 2, 20, 6, 15, 4
    kw = make_case(np.random.default_rng(3), batch, Dm, N, L, dtype=dtype, u_cl=True, delta_cl=True)
    both = [torch.full((n, 2, batch) + shape, float("nan"), dtype=dtype) for shape in ((Dm,), (N, Dm), (N,))]
    bufs = tuple(b[:, 1] for b in both)  # non-contiguous views
    y = scan_fused.selective_scan_fused(**kw, first_steps=bufs, reverse=reverse)
    steps = np.arange(L)[::-1][:n] if reverse else np.arange(L)[:n]
    dt = ref.softplus(kw["delta"].double().numpy() + kw["delta_bias"].double().numpy()[None, :, None])
    dt = dt[:, :, steps].transpose(2, 0, 1)  # (n, batch, D)
    abar = np.exp(dt[:, :, None, :] * kw["A"].double().numpy().T[None, None])  # (n, batch, N, D)
    b_ref = kw["B"].double().numpy()[:, :, steps].transpose(2, 0, 1)
    tol = 1e-14 if dtype == torch.float64 else 4e-7
    np.testing.assert_allclose(bufs[0].double().numpy(), dt, rtol=tol, atol=0)
    np.testing.assert_allclose(bufs[1].double().numpy(), abar, rtol=tol * (1 + np.abs(np.log(abar)).max()), atol=0)
    np.testing.assert_array_equal(bufs[2].double().numpy(), b_ref)
    assert torch.isnan(both[0][:, 0]).all(), "only the given views are written"
    assert rel_err(y, reference(kw, reverse)[0]) <= (F64_TOL if dtype == torch.float64 else 1e-6)


def test_first_steps_without_B_and_with_fixed_B():
    kw = make_case(np.random.default_rng(4), 1, 8, 3, 6, b_layout="fixed")
    d, a = torch.empty(2, 1, 8, dtype=torch.float64), torch.empty(2, 1, 3, 8, dtype=torch.float64)
    scan_fused.selective_scan_fused(**kw, first_steps=(d, a, None))
    assert torch.isfinite(d).all() and torch.isfinite(a).all()
    with pytest.raises(ValueError, match="B_out needs B"):
        scan_fused.selective_scan_fused(**kw, first_steps=(d, a, torch.empty(2, 1, 3, dtype=torch.float64)))


@pytest.mark.parametrize("cl", [False, True])
def test_output_layout_and_dtype_follow_u(cl):
    kw = make_case(np.random.default_rng(5), 2, 12, 4, 9, dtype=torch.bfloat16, u_cl=cl, delta_cl=cl, z_cl=cl)
    y, last = scan_fused.selective_scan_fused(**kw, return_last_state=True)
    assert y.dtype == torch.bfloat16 and last.dtype == torch.float32
    assert (y.stride(1) == 1) if cl else y.is_contiguous()
    y_ref = reference({k: (v.float() if torch.is_tensor(v) else v) for k, v in kw.items()})[0]
    assert rel_err(y, y_ref) < 1e-2  # bfloat16 output rounding


def test_any_strides_and_mixed_dtypes():
    """Sliced, transposed and broadcast (stride 0) views, and a float64 A: everything computes in float64."""
    rng = np.random.default_rng(6)
    kw = make_case(rng, 2, 16, 5, 30, dtype=torch.float32, b_layout="fixed")
    kw["u"] = torch.tensor(rng.standard_normal((2, 16, 60)), dtype=torch.float32)[:, :, ::2]
    kw["A"] = kw["A"].double()
    kw["B"] = kw["B"][:1].expand(16, 5)  # stride 0 rows
    kw["decay_scale"] = torch.tensor(rng.uniform(0.5, 2, (1, 30)), dtype=torch.float32).expand(2, 30)
    y, last = scan_fused.selective_scan_fused(**kw, return_last_state=True)
    y_ref, last_ref = reference(kw)
    assert y.dtype == torch.float32 and last.dtype == torch.float64
    assert rel_err(y, y_ref) < 1e-6 and rel_err(last, last_ref) <= F64_TOL


def test_results_do_not_depend_on_the_thread_count():
    kw = make_case(np.random.default_rng(7), 3, 70, 16, 50, dtype=torch.float32, u_cl=True, delta_cl=True, z_cl=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = scan_fused.selective_scan_fused(**kw, return_last_state=True)
        torch.set_num_threads(max(2, threads))
        many = scan_fused.selective_scan_fused(**kw, return_last_state=True)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


def test_empty_sequence_and_batch():
    kw = make_case(np.random.default_rng(8), 2, 6, 3, 1)
    for cut in ({"u": kw["u"][:, :, :0], "delta": kw["delta"][:, :, :0], "z": kw["z"][:, :, :0],
                 "B": kw["B"][:, :, :0], "C": kw["C"][:, :, :0]},
                {k: kw[k][:0] for k in ("u", "delta", "z", "B", "C")}):
        y, last = scan_fused.selective_scan_fused(**{**kw, **cut}, return_last_state=True)
        assert y.shape == cut["u"].shape and torch.all(last == 0)


def test_grad_requiring_inputs_are_refused():
    kw = make_case(np.random.default_rng(9), 1, 4, 2, 5)
    kw["u"].requires_grad_(True)
    with pytest.raises(ValueError, match="torch backend for training"):
        scan_fused.selective_scan_fused(**kw)
    with torch.no_grad():
        scan_fused.selective_scan_fused(**kw)


@pytest.mark.parametrize("change,match", [
    (lambda kw: kw.update(u=kw["u"][0]), "u and delta"),
    (lambda kw: kw.update(delta=kw["delta"][:, :, :-1]), "u and delta"),
    (lambda kw: kw.update(A=kw["A"][:-1]), "A of shape"),
    (lambda kw: kw.update(B=kw["B"][:, :, :-1]), "B of shape"),
    (lambda kw: kw.update(C=torch.zeros(1, 3, 4, 7, dtype=torch.float64)), "C of shape"),
    (lambda kw: kw.update(D=kw["D"][:-1]), "D of shape"),
    (lambda kw: kw.update(delta_bias=kw["delta_bias"][None]), "delta_bias of shape"),
    (lambda kw: kw.update(z=kw["z"][:, :-1]), "z of shape"),
    (lambda kw: kw.update(decay_scale=torch.ones(1, 6, dtype=torch.float64)), "decay_scale of shape"),
    (lambda kw: kw.update(A=kw["A"].to(torch.complex128)), "complex"),
])
def test_bad_shapes_give_clear_errors(change, match):
    kw = make_case(np.random.default_rng(10), 1, 8, 2, 7)
    change(kw)
    with pytest.raises(ValueError, match=match):
        scan_fused.selective_scan_fused(**kw)


def test_bad_first_steps_give_clear_errors():
    kw = make_case(np.random.default_rng(11), 1, 8, 2, 7)
    good = (torch.empty(3, 1, 8, dtype=torch.float64), torch.empty(3, 1, 2, 8, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="decay_scale"):
        scan_fused.selective_scan_fused(**{**kw, "decay_scale": torch.ones(1, 7, dtype=torch.float64)}, first_steps=good)
    with pytest.raises(ValueError, match="Abar_out must be"):
        scan_fused.selective_scan_fused(**kw, first_steps=(good[0], good[1].float(), None))
    with pytest.raises(ValueError, match="but L=7"):
        long = (torch.empty(9, 1, 8, dtype=torch.float64), torch.empty(9, 1, 2, 8, dtype=torch.float64), None)
        scan_fused.selective_scan_fused(**kw, first_steps=long)


def test_build_info_names_the_host_capability():
    cap = os.environ.get("STM_FUSED_CAPABILITY", "").upper() or torch.backends.cpu.get_cpu_capability()
    assert REASON.startswith(f"built for {cap if cap in ('AVX2', 'AVX512') else 'DEFAULT'} ")


def test_a_failed_build_is_reported_not_raised(monkeypatch):
    def broken():
        raise RuntimeError("Error building extension 'x':\nfoo.cpp:1:1: error: something broke\nmore")

    monkeypatch.setattr(scan_fused, "_state", {})
    monkeypatch.setattr(scan_fused, "_build", broken)
    ok, reason = scan_fused.available()
    assert not ok and reason == "fused scan build failed: error: something broke"
    assert scan_fused.available() == (ok, reason)  # cached, not retried
    with pytest.raises(RuntimeError, match="unavailable: fused scan build failed"):
        scan_fused.selective_scan_fused(**make_case(np.random.default_rng(12), 1, 2, 2, 3))


def test_missing_compiler_gives_false_and_one_line(tmp_path):
    """In a fresh process (the loaded module here is unaffected), with a compiler that does not exist."""
    env = dict(os.environ, CXX="/nonexistent/g++", STM_FUSED_BUILD_DIR=str(tmp_path))
    code = "from stm_fast.ops import scan_fused; ok, why = scan_fused.available(); print(ok); print(why)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == "False" and "/nonexistent/g++" in lines[-1] and "not found" in lines[-1]
    assert not any(tmp_path.iterdir()), "nothing is built without a compiler"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exported_first_steps_equal_the_torch_backends(dtype):
    """Through ``stm_fast.ssm.scan_steps``: the first steps the fused kernel returns hold what the torch
    backend returns (delta, Abar, B of the first n steps; the values STM's eq. 11 weights read)."""
    kw = make_case(np.random.default_rng(13), 2, 24, 8, 30, dtype=dtype, u_cl=True, delta_cl=True, z_cl=True)
    kw.pop("decay_scale")
    with torch.inference_mode():
        out = stm_fast.ssm.scan_steps(**kw, backend="fused", first_steps=5)
        out_t = stm_fast.ssm.scan_steps(**kw, backend="torch", first_steps=5)
    (y, got), (y_t, want) = (out.y, out.first), (out_t.y, out_t.first)
    assert got is not None and want is not None
    tol = 1e-14 if dtype == torch.float64 else 1e-6
    for name in ("delta", "Abar", "B"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape and a.dtype == b.dtype == dtype, name
        assert rel_err(a, b.double().numpy()) <= tol, name
    assert rel_err(y, y_t.double().numpy()) <= (F64_TOL if dtype == torch.float64 else 1e-6)


def _host_capabilities():
    """The ATen capabilities this host can run: generic code always, then AVX2 and AVX-512 as it has them."""
    host = str(torch.backends.cpu.get_cpu_capability())
    return ["DEFAULT"] + {"AVX2": ["AVX2"], "AVX512": ["AVX2", "AVX512"]}.get(host, [])


@pytest.mark.parametrize("capability", _host_capabilities())
def test_every_build_this_host_can_run_matches_the_reference(capability):
    """Each build of the kernel (generic code, and each SIMD capability the host has), in its own process,
    against the float64 reference on Vim's layouts in float32 and float64 (the float32 bound is the one the
    in-process tests use)."""
    code = f"""
import numpy as np, torch
from stm_fast.ops import scan_fused
from tests.builders import make_case, reference, rel_err
ok, why = scan_fused.available()
assert ok and why.startswith("built for {capability} "), why
errs = []
for dtype in (torch.float32, torch.float64):
    kw = make_case(np.random.default_rng(14), 2, 40, 16, 57, dtype=dtype, u_cl=True, delta_cl=True, z_cl=True)
    y, last = scan_fused.selective_scan_fused(**kw, return_last_state=True)
    y_ref, last_ref = reference(kw)
    errs.append(max(rel_err(y, y_ref), rel_err(last, last_ref)))
print(errs[0], errs[1])
"""
    env = dict(os.environ, STM_FUSED_CAPABILITY=capability)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    f32, f64 = map(float, out.stdout.split())
    assert f32 <= 2e-6 and f64 <= F64_TOL, (f32, f64)


@st.composite
def conv_cases(draw):
    E = draw(st.one_of(st.integers(1, 40), st.sampled_from([15, 16, 17, 31, 32, 33])))
    L, K = draw(st.integers(1, 60)), draw(st.integers(1, 5))
    return E, L, K, draw(st.booleans()), draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 2**32 - 1))


@settings(max_examples=40)
@given(conv_cases())
def test_fused_conv_matches_reference(case):
    """The one-pass causal conv (+ SiLU) equals stm_ref.vim.causal_conv1d in float64 (1e-12) and float32
    (2e-6 of the scale), on x held as half of wider rows (the mixer's view of in_proj's output); reversed,
    it equals the reference's conv of the time-flipped sequence, flipped back."""
    E, L, K, with_bias, act, reverse, seed = case
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((2, L, 2 * E))
    w, b = rng.standard_normal((E, 1, K)), rng.standard_normal(E) if with_bias else None
    seq = (lambda a: a[:, ::-1]) if reverse else (lambda a: a)  # noqa: E731
    want = np.stack([seq(ref.silu(v) if act else v) for v in
                     (ref_vim.causal_conv1d(seq(rows[i, :, :E].T), w, b if with_bias else np.zeros(E)) for i in range(2))])
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        x = torch.tensor(rows, dtype=dtype)[:, :, :E].transpose(1, 2)  # (2, E, L), channel stride 1
        y = scan_fused.causal_conv_silu(x, torch.tensor(w, dtype=dtype),
                                        None if b is None else torch.tensor(b, dtype=dtype), act, reverse)
        assert y.shape == (2, E, L) and y.dtype == dtype and (y.stride(1) == 1 or E == 1)
        assert rel_err(y, want) <= tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ends_weights_leave_the_first_steps_as_they_found_them(dtype):
    """STM's compiled lsq weights (eq. 11) read the exported first steps and write nothing else: the Abar buffer
    is unchanged, the weights are (S, batch, r), lsq_norm is lsq clamped to [0, 1], and a variant the kernel
    does not compute is refused. (That they equal the variants' definition: tests/test_merge.py::
    test_every_fast_form_equals_its_variants_definition, with every other faster form.)"""
    rng = np.random.default_rng(15)
    n, S, batch, N, E, r = 5, 2, 3, 16, 37, 4
    d = torch.tensor(rng.uniform(0.01, 1, (n, S, batch, E)), dtype=dtype)
    abar = torch.tensor(rng.uniform(0.3, 1, (n, S, batch, N, E)), dtype=dtype)
    B = torch.tensor(rng.standard_normal((n, S, batch, N)), dtype=dtype)
    kept = abar.clone()
    got = scan_fused.ends_lsq_weights(d, abar, B, r, "lsq")
    assert torch.equal(abar, kept) and got.shape == (S, batch, r) and got.dtype == dtype
    assert (got < 0).any()  # weights of both signs: the clamp to [0, 1] matters
    assert torch.equal(scan_fused.ends_lsq_weights(d, abar, B, r, "lsq_norm"), got.clamp(0.0, 1.0))
    with pytest.raises(ValueError, match="'mean'"):
        scan_fused.ends_lsq_weights(d, abar, B, r, "mean")
