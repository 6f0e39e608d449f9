"""The fast path on this machine, certified against the float64 reference: every scan backend on every
device available here, on small Vision Mambas with every reduction method.

Hypothesis draws the model (image, patch and stride, depth, width, d_state, batch including 1; odd grids put
the class token off-centre) and a reduction: every method with its options and a schedule, the edges
included (a step that takes a side down to one token, per-image class positions of the data-dependent
methods, the released flavours). For each (device, backend):

* float64 logits equal ``stm_ref.vim.forward`` to 1e-9, and logits and every final token (after the final
  norm) equal the reference's to 1e-11 of their scale (where the backend computes float64; round-off is
  below 1e-14 at these sizes);
* float32 logits (bf16 autocast on CUDA) are no further from the float64 reference than twice the torch
  backend's own float32 (bf16) error on the same inputs, plus a floor of 1e-6 (bf16: 1e-3) of the logit
  scale: the bound means the same on every device. This one runs the methods without discrete data-
  dependent choices (none, stm): a float32 near-tie can flip a ToMe/ToP/EViT/MTR choice, which is not an
  error of the backend.

The test ids name what was certified (``cpu-torch``, ``cuda-triton`` ...); a line at the end of the run
(``verify/conftest.py``) lists the combinations certified and those not available here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, strategies as st

import stm_fast
from stm_fast import ssm
from stm_fast.reduction.merge import WEIGHT_VARIANTS
from stm_ref import vim as ref_vim

GEOMETRIES = [(8, 4, None), (12, 4, None), (16, 4, None), (10, 4, 2), (11, 3, 2), (6, 3, None)]
# STM's weight variants certified here: every one computed from the layer's delta, A and B or constant, the
# table's order (those that need other inputs, the tokens' sizes or the scan input u, are tested elsewhere)
STM_WEIGHTS = [name for name, v in WEIGHT_VARIANTS.items() if not v.extra_inputs]


# (device, backend, computes float64): every target there can be; those this machine lacks are skipped when
# the test runs, so that collecting the tests probes (and compiles) nothing. The Triton interpreter is no target.
CANDIDATES = [("cpu", "fused", True), ("cpu", "torch", True), ("cuda", "mamba_ssm", False), ("cuda", "triton", True),
              ("cuda", "torch", True)]


def _require(device, backend):
    """Skip unless ``backend`` runs on ``device`` here (probed on first use, not at collection)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if backend not in ssm.available_backends(device):
        pytest.skip(f"{device}/{backend} does not run here")


TARGETS = [pytest.param(d, b, f64, id=f"{d}-{b}") for d, b, f64 in CANDIDATES]


def _pick(draw, options):
    """One of ``options``, drawn from a wide integer: Hypothesis's derandomized draws favour the first entries
    of a sampled_from, and every option must come up in a short search."""
    return options[draw(st.integers(0, 2**31)) % len(options)]


def _stm_schedule(draw, depth, side, unit):
    """Tokens after each layer for STM: per side, at most side - 1 in total (one token stays)."""
    left, out = max(side - 1, 0), []
    for _ in range(depth - 1):
        r = draw(st.integers(0, min(left, 4)))
        out.append(unit * r)
        left -= r
    return out


METHODS = ["stm", "tome", "stm", "top", "evit", "stm", "mtr", "rmeeto", "top-released", "none"]


@st.composite
def reductions(draw, method, depth, L, cls):
    """kwargs of a reduction ``method`` on a model of ``depth`` layers and L tokens, edges included."""
    if method == "none":
        return "none", {}
    layers = list(range(depth - 1))
    if method == "stm":
        opts = dict(sides=_pick(draw, ["both", "left", "right"]), positions=_pick(draw, ["ends", "uniform"]),
                    weights=_pick(draw, STM_WEIGHTS))
        side = {"both": min(cls, L - 1 - cls), "left": cls, "right": L - 1 - cls}[opts["sides"]]
        unit = 2 if opts["sides"] == "both" else 1
        if draw(st.booleans()):  # the edge: one step takes the side(s) down to one token
            return "stm", dict(schedule=[unit * max(side - 1, 0)] + [0] * (depth - 2), **opts)
        return "stm", dict(schedule=_stm_schedule(draw, depth, side, unit), **opts)
    if method == "rmeeto":
        return "tome", dict(flavour="rmeeto", num_prune=draw(st.integers(1, 4)), compare=draw(st.integers(0, 3)))
    if method == "top-released":
        return "top", dict(flavour="released", layers=layers, keep_ratio=_pick(draw, [0.6, 0.8]))
    extra = {"align": draw(st.booleans())} if method == "top" else {"keep_frac": _pick(draw, [0.0, 0.5])} \
        if method == "mtr" else {}
    schedule = [draw(st.integers(0, 3)) for _ in layers]
    return method, dict(schedule=schedule, layers=layers if method != "tome" else "all", **extra)


@st.composite
def cases(draw):
    method = _pick(draw, METHODS)
    img, patch, stride = draw(st.sampled_from(GEOMETRIES))
    depth = draw(st.integers(1, 3) if method == "none" else st.integers(2, 3))  # a reduction needs two layers
    grid = (img - patch) // (stride or patch) + 1
    L = grid * grid + 1
    method, kwargs = draw(reductions(method, depth, L, (L - 1) // 2))
    return dict(seed=draw(st.integers(0, 10_000)), img=img, patch=patch, stride=stride, depth=depth,
                embed_dim=draw(st.integers(2, 12)), d_state=draw(st.integers(1, 8)), batch=draw(st.integers(1, 3)),
                method=method, kwargs=kwargs)


def coverage_cases():
    """A fixed list of cases that reaches every method and option the strategy draws (each STM side, plan and
    weight variant, ToP's alignment on and off, both flavours), for checks that need all of them at once."""
    geometries = [(16, 4, None), (11, 3, 2), (10, 4, 2)]
    out = []
    stm = [dict(sides=s, positions=p, weights=w) for s in ("both", "left", "right") for p in ("ends", "uniform")
           for w in STM_WEIGHTS]
    kwargs = [("stm", dict(schedule=[4, 2], **o)) for o in stm[::3]] + [("stm", dict(schedule=[6, 0], **stm[0]))]
    kwargs += [("tome", dict(schedule=[2, 2], layers="all")), ("top", dict(schedule=[3, 2], layers=[0, 1], align=True)),
               ("top", dict(schedule=[3, 2], layers=[0, 1], align=False)), ("evit", dict(schedule=[3, 2], layers=[0, 1])),
               ("mtr", dict(schedule=[3, 2], layers=[0, 1])), ("tome", dict(flavour="rmeeto", num_prune=2, compare=1)),
               ("top", dict(flavour="released", layers=[0, 1], keep_ratio=0.6))]
    for i, (method, kw) in enumerate(kwargs):
        img, patch, stride = geometries[i % len(geometries)]
        out.append(dict(seed=i, img=img, patch=patch, stride=stride, depth=3, embed_dim=8, d_state=4, batch=2,
                        method=method, kwargs=kw))
    return out


def _model(case, dtype):
    torch.manual_seed(case["seed"])
    m = stm_fast.create_model("vim_tiny", img_size=case["img"], patch_size=case["patch"], stride=case["stride"],
                              embed_dim=case["embed_dim"], depth=case["depth"], d_state=case["d_state"], num_classes=5,
                              dtype=dtype)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "A_" in name or "dt_proj" in name and "bias" in name else 0.2))
    try:
        stm_fast.reduce(m, case["method"], **case["kwargs"])
    except ValueError:
        assume(False)  # this draw asks for a reduction the small model cannot take
    return m


def _inputs(case):
    g = torch.Generator().manual_seed(case["seed"] + 1)
    return torch.randn(case["batch"], 3, case["img"], case["img"], dtype=torch.float64, generator=g)


def _reference(m, x, tokens=False):
    """The float64 reference's logits and, with ``tokens``, every image's final tokens (after the final norm)."""
    sd = {k: v.detach().double().numpy() for k, v in m.state_dict().items()}
    reduction = None if m.reduction is None else m.reduction.to_dict()
    logits = ref_vim.forward(sd, x.numpy(), reduction=reduction)
    if not tokens:
        return logits
    sdf = {k: np.asarray(v, dtype=np.float64) for k, v in sd.items()}
    return logits, np.stack([ref_vim.final_tokens(sdf, im, reduction=reduction, image_index=b)[0]
                             for b, im in enumerate(x.numpy())])


def _logits(m, x, device, backend, amp=None, tokens=False):
    """Logits through ``backend`` on ``device`` and, with ``tokens``, the final norm's output (every token)."""
    m = m.to(device).set_scan_backend(backend)
    seen = []
    hook = m.norm_f.register_forward_hook(lambda mod, args, out: seen.append(out)) if tokens else None
    with torch.no_grad(), torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
        logits = m(x.to(device, m.pos_embed.dtype)).double().cpu().numpy()
    if hook is None:
        return logits
    hook.remove()
    return logits, seen[0].double().cpu().numpy()


@pytest.mark.parametrize("device,backend,f64", TARGETS)
@given(case=cases())
def test_fast_path_equals_the_reference_in_float64(device, backend, f64, case):
    """float64 logits of the fast model through this backend and device = stm_ref.vim.forward (<= 1e-9 and
    <= 1e-11 of the logit scale)."""
    _require(device, backend)
    if not f64:
        pytest.skip(f"{backend} computes float32/16/bf16 only")
    check_float64(case, device, backend)


def check_float64(case, device, backend):
    """The float64 property on one case (also run by the fast path's mutation tests)."""
    m = _model(case, torch.float64)
    x = _inputs(case)
    (got, got_tokens), (want, want_tokens) = _logits(m, x, device, backend, tokens=True), _reference(m, x, tokens=True)
    assert np.abs(want).max() > 1e-3, "logits must be non-trivial for the comparison to mean something"
    err = np.abs(got - want).max()
    assert err <= 1e-9, f"max |dlogit| {err:.3e}"
    # float64 round-off in models this small stays below 1e-14 of the scale: 1e-11 leaves three orders of
    # margin and still sees a 1e-6 relative error in one element of one layer's computation, whichever token
    # it hits (the head reads only the class token; the final tokens show every token)
    assert err <= 1e-11 * (1 + np.abs(want).max()), f"max |dlogit| {err:.3e}: more than float64 round-off"
    assert got_tokens.shape == want_tokens.shape
    tok_err = np.abs(got_tokens - want_tokens).max()
    assert tok_err <= 1e-11 * (1 + np.abs(want_tokens).max()), f"final tokens differ by {tok_err:.3e}"


@pytest.mark.parametrize("device,backend,f64", TARGETS)
@pytest.mark.parametrize("precision", ["f32", "bf16"])
@given(case=cases())
def test_fast_path_low_precision_error_is_at_most_twice_the_torch_backends(device, backend, f64, precision, case):
    """float32 (bf16 autocast, CUDA only) logits through this backend: error vs the float64 reference <= 2x the
    torch backend's error in the same precision on the same device, + a floor (module docstring)."""
    if precision == "bf16" and device != "cuda":
        pytest.skip("bf16 autocast is certified on CUDA")
    _require(device, backend)
    assume(case["method"] in ("none", "stm"))
    m64 = _model(case, torch.float64)
    want = _reference(m64, _inputs(case))
    m = m64.float()
    amp = torch.bfloat16 if precision == "bf16" else None
    x = _inputs(case).float()
    err = np.abs(_logits(m, x, device, backend, amp) - want).max()
    err_torch = np.abs(_logits(m, x, device, "torch", amp) - want).max()
    floor = (1e-3 if amp else 1e-6) * (1 + np.abs(want).max())
    assert err <= 2 * err_torch + floor, f"{backend} error {err:.3e} vs torch {err_torch:.3e} (floor {floor:.1e})"


@given(case=cases())
def test_reported_rate_is_the_rate_of_the_tokens_each_layer_receives(case):
    """docs/conventions.md §6: the Reduction's rate = 1 - sum_l N_l / (depth * N_0), with N_l counted on the
    tokens that actually enter each layer of a forward (a hook on every layer), and its tokens_per_layer
    are those counts."""
    check_rate(case)


def check_rate(case):
    """The rate property on one case."""
    m = _model(case, torch.float64)
    seen = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1])) for layer in m.layers]
    with torch.no_grad():
        m(_inputs(case))
    for h in hooks:
        h.remove()
    reported = m.reduction.rate if m.reduction is not None else 0.0
    assert abs(reported - (1 - sum(seen) / (len(seen) * seen[0]))) <= 1e-12
    if m.reduction is not None:
        assert list(m.reduction.tokens_per_layer) == seen
