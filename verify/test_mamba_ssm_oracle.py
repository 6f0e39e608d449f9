"""``stm_ref.ssm.selective_scan`` against the real mamba-ssm ``selective_scan_ref`` (external oracle).

mamba-ssm is optional (install it with ``.ci/install_oracles.sh``, CPU-only is fine); without it this
module is skipped. Only the pure-PyTorch ``selective_scan_ref`` is used. Its module,
``mamba_ssm.ops.selective_scan_interface``, imports the CUDA extension ``selective_scan_cuda`` at
module level, and ``mamba_ssm/__init__.py`` imports the model classes (transformers,
huggingface_hub, ...); so it is imported with a stub for the missing CUDA extension and a bare
``mamba_ssm`` package object (real ``__path__``, ``__init__`` not run), both only during the import.

The reference casts its inputs to float32 with ``.float()``. For the float64 comparison
``torch.Tensor.float`` is patched to return ``self`` during the call, so the very same code runs in
float64 and the two implementations must agree to round-off. A second test runs the unpatched
reference in float32.
"""

import importlib
import importlib.util
import itertools
import sys
import types
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, strategies as st

from stm_ref import ssm
from verify.strategies import draw_A, seeds, signed_loguniform

_NEEDED = ("mamba_ssm", "einops", "triton", "torch")
_missing = [m for m in _NEEDED if importlib.util.find_spec(m) is None]
if _missing:
    pytest.skip(
        f"external oracle unavailable: {', '.join(_missing)} not installed "
        "(run .ci/install_oracles.sh to install mamba-ssm without CUDA)",
        allow_module_level=True,
    )

import torch  # noqa: E402

_CUDA_EXTENSIONS = ("selective_scan_cuda",)


def _import_selective_scan_ref():
    """``selective_scan_ref`` from the installed mamba-ssm, with the stubs in sys.modules only meanwhile."""
    saved = dict(sys.modules)
    added = []
    try:
        if "mamba_ssm" not in sys.modules:
            spec = importlib.util.find_spec("mamba_ssm")
            pkg = types.ModuleType("mamba_ssm")
            pkg.__path__ = list(spec.submodule_search_locations)
            pkg.__spec__ = spec
            pkg.__file__ = spec.origin
            sys.modules["mamba_ssm"] = pkg
            added.append("mamba_ssm")
        for name in _CUDA_EXTENSIONS:
            if name not in sys.modules and importlib.util.find_spec(name) is None:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
        module = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        return module.selective_scan_ref
    finally:
        # Drop the stubs and everything imported under the bare package; keep genuine third-party
        # modules (einops, triton). The returned function keeps its own module globals alive.
        for name in list(sys.modules):
            if name not in saved and (name in added or name == "mamba_ssm" or name.startswith("mamba_ssm.")):
                del sys.modules[name]
        for name in added:
            sys.modules.pop(name, None)
        for name in _CUDA_EXTENSIONS + ("mamba_ssm",):
            if name in saved:
                sys.modules[name] = saved[name]


selective_scan_ref = _import_selective_scan_ref()

LAYOUTS = ("variable", "fixed", "grouped")  # B/C as (batch, N, L), (D, N), (batch, G, N, L)
# Every combination of the structural switches: layout x D x z x delta_bias x delta_softplus.
# (return_last_state is exercised both ways in every example.)
COMBINATIONS = list(itertools.product(LAYOUTS, *[(False, True)] * 4))
COMBO_IDS = [
    f"{lay}-D{int(d)}-z{int(z)}-bias{int(b)}-softplus{int(s)}" for lay, d, z, b, s in COMBINATIONS
]


@st.composite
def scan_inputs(draw, layout, with_D, with_z, with_bias, softplus):
    """Arguments in selective_scan_ref's layouts; values in the ranges of verify/strategies.py."""
    rng = np.random.default_rng(draw(seeds))
    batch, Dm = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    N, L = draw(st.integers(1, 16)), draw(st.integers(1, 64))
    u = rng.standard_normal((batch, Dm, L))
    if softplus:
        # softplus^-1 of about [2.5e-3, 1.7]; plus, in some examples, a few entries around torch's
        # softplus threshold 20 (x > 20 returns x), where log1p(exp(x)) and x differ by 2e-9.
        delta = rng.uniform(-6.0, 1.5, (batch, Dm, L))
        if draw(st.booleans()):
            mask = rng.random(delta.shape) < 0.1
            delta = np.where(mask, rng.uniform(18.0, 22.0, delta.shape), delta)
        bias = rng.uniform(-1.0, 1.0, Dm) if with_bias else None
    else:
        # Used as is, so it must already be > 0 (log-uniform in [1e-3, 2]); a bias keeps it > 0.
        delta = np.exp(rng.uniform(np.log(1e-3), np.log(2.0), (batch, Dm, L)))
        bias = rng.uniform(0.0, 0.5, Dm) if with_bias else None
    A = draw_A(rng, (Dm, N))  # -exp(U[log 1e-3, log 20])
    if layout == "variable":
        shape = (batch, N, L)
    elif layout == "fixed":
        shape = (Dm, N)
    else:
        G = draw(st.sampled_from([g for g in range(1, Dm + 1) if Dm % g == 0]))
        shape = (batch, G, N, L)
    B, C = signed_loguniform(rng, shape), signed_loguniform(rng, shape)  # both signs, |.| in [1e-4, 4]
    D = rng.standard_normal(Dm) if with_D else None
    z = rng.standard_normal((batch, Dm, L)) if with_z else None
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias, delta_softplus=softplus)


def _magnitude(kw):
    """Element-wise sums of |terms| that make up y and the last state (same delta, |u|, |B|, |C|, |D|, |silu z|)."""
    absd = dict(kw, u=np.abs(kw["u"]), B=np.abs(kw["B"]), C=np.abs(kw["C"]), z=None)
    absd["D"] = None if kw["D"] is None else np.abs(kw["D"])
    y, last = ssm.selective_scan(**absd, return_last_state=True)
    if kw["z"] is not None:
        y = y * np.abs(ssm.silu(kw["z"]))
    return y, last


def _run_ref(kw, dtype, return_last_state):
    t = {k: (torch.from_numpy(np.ascontiguousarray(v)).to(dtype) if isinstance(v, np.ndarray) else v)
         for k, v in kw.items()}
    with torch.no_grad():
        out = selective_scan_ref(**t, return_last_state=return_last_state)
    if return_last_state:
        return out[0].numpy(), out[1].numpy()
    return out.numpy()


def _run_ref_float64(kw, return_last_state):
    # selective_scan_ref starts with u.float(), delta.float(), B.float(), ...: make those no-ops so
    # the reference's own code runs in float64.
    with mock.patch.object(torch.Tensor, "float", lambda self, *args, **kwargs: self):
        return _run_ref(kw, torch.float64, return_last_state)


@pytest.mark.parametrize("layout,with_D,with_z,with_bias,softplus", COMBINATIONS, ids=COMBO_IDS)
@given(data=st.data())
def test_selective_scan_equals_mamba_ssm_selective_scan_ref_in_float64(data, layout, with_D, with_z, with_bias, softplus):
    """stm_ref's selective_scan has exactly selective_scan_ref's layouts and semantics.

    The real mamba-ssm reference, run in float64, gives the same y and last state, in every
    combination of B/C layout, D, z, delta_bias and delta_softplus, with and without
    return_last_state.
    """
    kw = data.draw(scan_inputs(layout, with_D, with_z, with_bias, softplus))
    y, last = ssm.selective_scan(**kw, return_last_state=True)
    ref_y, ref_last = _run_ref_float64(kw, return_last_state=True)
    ref_y_only = _run_ref_float64(kw, return_last_state=False)
    assert ref_y.dtype == np.float64 and ref_last.dtype == np.float64  # the .float() patch took effect
    assert ref_y.shape == y.shape == kw["u"].shape and ref_last.shape == last.shape
    assert np.array_equal(ref_y_only, ref_y)
    assert np.array_equal(ssm.selective_scan(**kw), y)

    # Tolerance: both sides are float64 and do the same O(L + N) operations per output (products,
    # one sum over N, a length-L recurrence), differing only in evaluation order and in the
    # last-ulp behaviour of exp/softplus/silu. Round-off is then below ~(L + N + 8) * 2^-53 ~ 1e-14
    # of the sum of |terms| (`mag`, L <= 64, N <= 16); 1e-12 leaves two orders of margin while any
    # semantic difference (e.g. the softplus threshold, 2e-9 relative) is far above it.
    mag_y, mag_last = _magnitude(kw)
    np.testing.assert_allclose(y, ref_y, rtol=1e-12, atol=1e-12 * (1.0 + mag_y.max()))
    np.testing.assert_allclose(last, ref_last, rtol=1e-12, atol=1e-12 * (1.0 + mag_last.max()))


@given(data=st.data())
def test_mamba_ssm_selective_scan_ref_in_float32_matches_float64_reference(data):
    """The unpatched reference on float32 inputs agrees with stm_ref (on the same values) to float32 round-off."""
    layout = data.draw(st.sampled_from(LAYOUTS))
    flags = [data.draw(st.booleans()) for _ in range(4)]
    kw = data.draw(scan_inputs(layout, *flags))
    kw = {k: (v.astype(np.float32) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    ref_y, ref_last = _run_ref(kw, torch.float32, return_last_state=True)
    assert ref_y.dtype == np.float32
    y, last = ssm.selective_scan(**kw, return_last_state=True)  # exact float64 on the float32 values

    # Tolerance: the float32 reference accumulates ~(L + N + 8) roundings of 2^-24 (~80 * 6e-8 =
    # 4.8e-6 for L <= 64, N <= 16) relative to the sum of |terms|; 2e-5 leaves a factor of 4, and
    # is still 1e-4 below a semantic slip's typical O(1) relative error.
    mag_y, mag_last = _magnitude(kw)
    np.testing.assert_allclose(ref_y, y, rtol=2e-5, atol=2e-5 * (1.0 + mag_y.max()))
    np.testing.assert_allclose(ref_last, last, rtol=2e-5, atol=2e-5 * (1.0 + mag_last.max()))
