"""The CUDA paths, tested on a CPU: backends chosen because they work, the calls mamba-ssm's kernel accepts,
the process group and device of each rank, device guards and synchronisation, gradients, 64-bit offsets,
and first-steps buffers allocated only for a backend that fills them.

mamba-ssm and causal-conv1d are replaced by fakes that behave as the real packages do when their CUDA
extension is missing (importable, the kernel import failing) or present (a ``selective_scan_cuda.fwd`` that
enforces the C++ entry's checks and computes with the float64 reference).
"""

import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch

import dataclasses

import stm_fast
from stm_fast import ssm
from stm_fast.ops import backends, probe, scan_triton
from stm_fast.runtime import synchronize
from stm_ref import ssm as ref

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def fresh_probes():
    probe.clear_probes()
    yield
    probe.clear_probes()


def _fake_package(root, name, init):
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(init)
    return pkg


def test_mamba_ssm_without_its_kernel_is_not_chosen(tmp_path, monkeypatch, capsys):
    """mamba-ssm installed without selective_scan_cuda (what a CPU-only build or install_oracles.sh gives):
    the automatic choice on CUDA passes it over with one line saying why; asking for it is a clear error."""
    pkg = _fake_package(tmp_path, "mamba_ssm", "import transformers_not_here  # as mamba_ssm/__init__ pulls in transformers\n")
    (pkg / "ops").mkdir()
    (pkg / "ops" / "selective_scan_interface.py").write_text("import selective_scan_cuda\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert ssm.resolve_backend(None, CUDA) in ("triton", "torch")
    assert ssm.resolve_backend(None, CUDA) != "mamba_ssm"
    err = capsys.readouterr().err
    assert err.count("the mamba_ssm scan kernel is installed but not used on cuda") == 1
    assert "ModuleNotFoundError: No module named 'selective_scan_cuda'" in err
    with pytest.raises(ssm.BackendUnavailable, match="selective_scan_cuda"):
        ssm.resolve_backend("mamba_ssm", CUDA)
    assert "mamba_ssm" not in ssm.available_backends(CUDA)


def test_causal_conv1d_whose_kernel_does_not_load_is_not_used(tmp_path, monkeypatch):
    from stm_fast.ops import conv

    _fake_package(tmp_path, "causal_conv1d", "import causal_conv1d_cuda\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ok, reason = probe.probe("causal_conv1d", CUDA, conv._check_causal_conv1d)
    assert not ok and "causal_conv1d_cuda" in reason


class FakeSelectiveScanCuda(types.ModuleType):
    """selective_scan_cuda with mamba-ssm's C++ checks (csrc/selective_scan/selective_scan.cpp) on CPU tensors."""

    def __init__(self):
        super().__init__("selective_scan_cuda")
        self.calls = []

    def fwd(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        it = u.dtype
        assert it in (torch.float32, torch.float16, torch.bfloat16), f"u dtype {it}"
        assert delta.dtype == it and (z is None or z.dtype == it), "delta/z must have u's dtype"
        assert A.dtype == torch.float32, f"A dtype {A.dtype}"
        for M in (B, C):
            assert M.dtype == (torch.float32 if M.dim() == 2 else it), f"B/C dtype {M.dtype} for dim {M.dim()}"
            assert M.dim() in (2, 4), "3-D B/C are unsqueezed to (batch, 1, N, L) by the caller"
        assert D is None or D.dtype == torch.float32
        assert delta_bias is None or delta_bias.dtype == torch.float32
        for t in (u, delta, z, B if B.dim() == 4 else None, C if C.dim() == 4 else None):
            assert t is None or t.stride(-1) == 1, "the last axis must be contiguous"
        self.calls.append(it)
        np_ = lambda t: None if t is None else t.detach().double().numpy()  # noqa: E731
        Bm, Cm = (M[:, 0] if M.dim() == 4 and M.shape[1] == 1 else M for M in (B, C))
        y, last = ref.selective_scan(np_(u), np_(delta), np_(A), np_(Bm), np_(Cm), np_(D), None, np_(delta_bias),
                                     delta_softplus, return_last_state=True)
        yz = y * np_(torch.nn.functional.silu(z.double())) if z is not None else y
        x = torch.zeros(u.shape[0], u.shape[1], 1, 2 * A.shape[1], dtype=torch.float32)
        x[:, :, -1, 1::2] = torch.as_tensor(last, dtype=torch.float32)
        out = torch.as_tensor(y, dtype=it)
        return (out, x) if z is None else (out, x, torch.as_tensor(yz, dtype=it))


@pytest.fixture
def fake_mamba(monkeypatch):
    """The fake kernel, and mamba_ssm made the automatic choice for CPU tensors (as it is on CUDA)."""
    fake = FakeSelectiveScanCuda()
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", fake)
    mamba = dataclasses.replace(backends.backend("mamba_ssm"), automatic_on=("cpu",))
    monkeypatch.setattr(ssm, "BACKENDS", (mamba,) + tuple(b for b in backends.BACKENDS if b.name in ("torch", "loop")))
    real = ssm._works
    monkeypatch.setattr(ssm, "_works", lambda b, device: (True, "") if b.name == "mamba_ssm" else real(b, device))
    return fake


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    m = stm_fast.create_model("vim_tiny", img_size=16, patch_size=4, embed_dim=16, depth=2, d_state=4, num_classes=5,
                              dtype=dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("mode", ["fp32", "bf16_autocast", "fp64_model"])
def test_mamba_ssm_kernel_sees_only_calls_it_accepts(fake_mamba, mode):
    """fp32 and bf16 autocast reach the fake kernel with exactly the dtypes and layouts its checks accept (and
    give the torch backend's logits); a float64 model never reaches it."""
    m = _model(torch.float64 if mode == "fp64_model" else torch.float32)
    x = torch.randn(2, 3, 16, 16, dtype=next(m.parameters()).dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16_autocast"):
        got = m(x)
        want = m.set_scan_backend("torch")(x)
    if mode == "fp64_model":
        assert fake_mamba.calls == []
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        return
    assert fake_mamba.calls and set(fake_mamba.calls) == {torch.bfloat16 if mode == "bf16_autocast" else torch.float32}
    tol = 5e-2 if mode == "bf16_autocast" else 1e-4
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max()))


def test_float64_is_never_sent_to_mamba_ssm_even_when_asked(fake_mamba):
    u = torch.randn(1, 2, 5, dtype=torch.float64)
    with pytest.raises(ssm.BackendUnavailable, match="float32/float16/bfloat16 only"):
        ssm.selective_scan(u, u, -torch.ones(2, 3, dtype=torch.float64), torch.randn(1, 3, 5, dtype=torch.float64),
                           torch.randn(1, 3, 5, dtype=torch.float64), backend="mamba_ssm")
    assert fake_mamba.calls == []


def test_each_rank_gets_its_own_gpu_and_a_gloo_group(monkeypatch):
    """The process group carries what is reduced (CPU tensors): gloo, even where CUDA exists; on CUDA each rank's
    device is made current before the group is created."""
    from stm_fast.eval import run

    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: events.append(("set_device", str(d))))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(run, "join_group", lambda world, backend: events.append(("init", backend)))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.delenv("STM_DIST_BACKEND", raising=False)
    assert run._dist(torch.device("cpu"), 2) == (1, 2)
    assert events == [("init", "gloo")]
    events.clear()
    run._dist(torch.device("cuda", 1), 2)
    assert events == [("set_device", "cuda:1"), ("init", "gloo")]


def test_under_torchrun_cuda_means_each_ranks_own_gpu(monkeypatch):
    from stm_fast.eval import run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    args = types.SimpleNamespace(device="cuda")
    assert run._device(args, world=4) == torch.device("cuda", 2)
    assert run._device(types.SimpleNamespace(device="cuda:3"), world=4) == torch.device("cuda", 3)


def test_synchronize_waits_for_the_device_in_use(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: seen.append(device))
    synchronize(torch.device("cuda", 1))
    synchronize(torch.device("cpu"))
    assert seen == [torch.device("cuda", 1)]


def test_triton_launches_inside_a_guard_of_the_inputs_device(monkeypatch):
    entered = []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Guard)
    with scan_triton._launch_guard(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    with pytest.raises(ValueError, match="every input must be on cpu, found meta"):
        scan_triton._same_device(torch.device("cpu"), torch.zeros(1), torch.zeros(1, device="meta"))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")
def test_triton_refuses_inputs_that_need_gradients_and_the_automatic_choice_stays_differentiable():
    rng = np.random.default_rng(0)
    leaf = lambda a: torch.tensor(a, requires_grad=True)  # noqa: E731
    leaves = [leaf(rng.standard_normal((1, 3, 6))), leaf(rng.uniform(0.1, 1, (1, 3, 6)))]
    A = leaf(-rng.uniform(0.5, 2, (3, 2)))
    B, C = (leaf(rng.standard_normal((1, 2, 6))) for _ in range(2))
    with pytest.raises(ssm.BackendUnavailable, match="forward-only and the inputs need gradients"):
        ssm.selective_scan(*leaves, A, B, C, backend="triton")
    assert ssm.resolve_backend(None, torch.device("cuda"), needs_grad=True) == "torch"
    y = ssm.selective_scan(*leaves, A, B, C)
    assert y.grad_fn is not None


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")
def test_triton_reads_grouped_B_C_without_copies(monkeypatch):
    rng = np.random.default_rng(1)
    kw = dict(u=rng.standard_normal((2, 4, 7)), delta=rng.uniform(0.1, 1, (2, 4, 7)), A=-rng.uniform(0.5, 2, (4, 3)),
              B=rng.standard_normal((2, 2, 3, 7)), C=rng.standard_normal((2, 4, 3, 7)))
    want = ref.selective_scan(**kw)
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", lambda *a, **k: (_ for _ in ()).throw(AssertionError("copy")))
    got = scan_triton.selective_scan_triton(**{k: torch.as_tensor(v) for k, v in kw.items()})
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-11, atol=1e-11)


TTIR = textwrap.dedent("""
    import re
    import triton._C.libtriton as lt
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from stm_fast.ops.scan_triton import _selective_scan_fwd as k
    import triton.language as tl
    const = {"HAS_D": True, "HAS_Z": True, "HAS_BIAS": True, "SOFTPLUS": True, "HAS_SCALE": True, "REVERSE": True,
             "STORE_LAST": True, "ACC": tl.float32, "BLOCK_D": 32, "BLOCK_N": 16}
    sig = {n: ("*fp32" if n.endswith("_ptr") else "constexpr" if n in const else "i32") for n in k.arg_names}
    src = ASTSource(fn=k, signature=sig, constexprs={(k.arg_names.index(n),): v for n, v in const.items()})
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    opts = backend.parse_options({})
    ctx = lt.ir.context(); lt.ir.load_dialects(ctx); backend.load_dialects(ctx)
    ir = str(src.make_ir(target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), ctx))
    assert "arith.muli" in ir
    print(sum(1 for l in ir.splitlines() if "arith.muli" in l and re.search(r"%pid_[bd]\\b", l) and ": i32" in l))
""")


def test_triton_kernel_offsets_are_64_bit():
    """The kernel compiled for a CUDA target (on this CPU, no GPU needed): no 32-bit product of a program id
    and a stride is left, so batch * D * L >= 2^31 cannot wrap (the kernel before the fix had 15)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", TTIR], capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode and ("ImportError" in proc.stderr or "AttributeError" in proc.stderr):
        pytest.skip(f"this Triton has no compatible compiler API: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "0"


def test_first_steps_are_asked_only_of_a_backend_whose_record_returns_them(monkeypatch):
    """STM asks the layer for the scan's first steps; a backend whose record says it returns none (loop here,
    as triton and mamba_ssm on a GPU) is called with first_steps=0, the statistics hold none, and the weights
    are recomputed: the same logits as through the torch backend, which returns them."""
    from stm_fast.layer_stats import StatsRequest
    from stm_fast.ops import scan_loop

    m = _model(torch.float64)
    mixer = m.layers[0].mixer
    h = torch.randn(2, 17, 16, dtype=torch.float64)
    asked = []
    real = scan_loop.scan
    monkeypatch.setattr(scan_loop, "scan", lambda call: (asked.append(call.first_steps), real(call))[1])
    with torch.no_grad():
        _, stats = mixer(h, request=StatsRequest(first_steps=3))
        assert stats.first_steps is not None and asked == []
        m.set_scan_backend("loop")
        _, stats = mixer(h, request=StatsRequest(first_steps=3))
        assert stats.first_steps is None and asked and set(asked) == {0}
        x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
        with stm_fast.reduced(m, "stm", schedule=[4]):
            loop = m(x)
            torch.testing.assert_close(loop, m.set_scan_backend("torch")(x), rtol=1e-10, atol=1e-12)


def test_the_bench_runs_every_default_method_with_mamba_ssm_as_the_automatic_choice(fake_mamba):
    """With mamba_ssm the automatic choice (as on CUDA), every default bench method runs: the choice is made per
    call, so ToP's decay scales, which mamba_ssm's kernel lacks, go to the next backend that takes them."""
    from stm_fast import bench

    default = next(a.default for a in bench.build_parser()._actions if a.dest == "methods")  # the CLI's methods
    rows = bench.run_bench(["vim_tiny"], default, rates=[0.3], batch_size=2, rounds=1, warmup=1, progress=False,
                           device="cpu", overrides=dict(img_size=16, patch_size=4, embed_dim=16, depth=6, d_state=4,
                                                        num_classes=5))
    assert {r["method"] for r in rows} == {"none", *default} and len(default) >= 5
    assert all(r["backend"] == "mamba_ssm" for r in rows)
    assert {r["backends_ran"] for r in rows if r["method"] == "top"} == {"mamba_ssm+torch"}
    assert fake_mamba.calls
