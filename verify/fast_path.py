"""What the certification of the fast path (``verify/test_fast_path.py``) draws and checks, apart from the tests
themselves so that other test modules (the fast path's mutation tests) can use it.

Targets: every (device, scan backend) the automatic choice may pick (``stm_fast.ops.backends``), read off the
backend table: the floor ``loop`` and the Triton interpreter on CPU are no targets. Reductions: every
registered method and flavour (``stm_fast.reduction``), each with one of its ``example_options`` and a
schedule drawn within its limits; STM, the subject, is drawn three times as often; STM's weights come from
those computed from the layer's statistics or constant (``STM_WEIGHTS``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, strategies as st

import stm_fast
from stm_fast import ssm
from stm_fast.ops.backends import BACKENDS
from stm_fast.reduction import METHODS, method_class
from stm_fast.reduction.merge import WEIGHT_VARIANTS
from stm_fast.vim import VimConfig
from stm_ref import vim as ref_vim

__all__ = ["GEOMETRIES", "STM_WEIGHTS", "CANDIDATES", "DRAWN", "require", "cases", "coverage_cases", "model", "inputs",
           "reference", "logits", "check_float64", "check_rate"]

GEOMETRIES = [(8, 4, None), (12, 4, None), (16, 4, None), (10, 4, 2), (11, 3, 2), (6, 3, None)]
# STM's weight variants certified here: every one computed from the layer's delta, A and B or constant, the
# table's order (those that need other inputs, the tokens' sizes or the scan input u, are tested elsewhere)
STM_WEIGHTS = [name for name, v in WEIGHT_VARIANTS.items() if not v.extra_inputs]

# (device, backend, computes float64): every target there can be; those this machine lacks are skipped when
# the test runs, so that collecting the tests probes (and compiles) nothing
CANDIDATES = [(device, b.name, torch.float64 in b.dtypes) for device in ("cpu", "cuda") for b in BACKENDS
              if b.runs_on(torch.device(device)) and ("*" in b.automatic_on or device in b.automatic_on)]

# (method, flavour) of every draw: each registered method and flavour, STM three times, and no reduction
DRAWN = [(n, None) for n in METHODS] + [(n, f) for n, cls in METHODS.items() for f in cls.flavours] + \
        [("stm", None), ("stm", None), ("none", None)]


def require(device, backend):
    """Skip unless ``backend`` runs on ``device`` here (probed on first use, not at collection)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if backend not in ssm.available_backends(device):
        pytest.skip(f"{device}/{backend} does not run here")


def _pick(draw, options):
    """One of ``options``, drawn from a wide integer: Hypothesis's derandomized draws favour the first entries
    of a sampled_from, and every option must come up in a short search."""
    return options[draw(st.integers(0, 2**31)) % len(options)]


def _options(draw, method, flavour, depth):
    """One of the method's example option sets; STM's weights drawn from ``STM_WEIGHTS``."""
    opts = dict(_pick(draw, method_class(method, flavour).example_options(depth)))
    if method == "stm" and flavour is None:
        opts["weights"] = _pick(draw, STM_WEIGHTS)
    return opts


def _schedule(draw, impl):
    """Tokens removed after each layer within the method's step unit, per-step limit and budget; the edge
    (the first step takes all it may) one time in two."""
    cfg, unit = impl.cfg, impl.step_unit
    out, L, left = [0] * (cfg.depth - 1), cfg.num_tokens, impl.token_budget()
    edge = draw(st.booleans())
    for i in impl.reduction_points():
        most = min(impl.max_per_step(L), L if left is None else left) // unit
        k = unit * (most if edge else draw(st.integers(0, min(most, 3))))
        out[i], L, left, edge = k, L - k, None if left is None else left - k, False
    return out


@st.composite
def cases(draw):
    """A small Vim and a reduction on it: the keyword arguments ``model`` and ``stm_fast.reduce`` take."""
    method, flavour = _pick(draw, DRAWN)
    img, patch, stride = draw(st.sampled_from(GEOMETRIES))
    depth = draw(st.integers(1, 3) if method == "none" else st.integers(2, 3))  # a reduction needs two layers
    cfg = VimConfig(img_size=img, patch_size=patch, stride=stride, depth=depth, embed_dim=8, d_state=4)
    kwargs = {}
    if method != "none":
        kwargs = _options(draw, method, flavour, depth)
        try:
            impl = method_class(method, flavour)(cfg, **kwargs)
        except ValueError:
            assume(False)  # these example options do not fit this small model
        if impl.default_schedule() is None:
            kwargs["schedule"] = _schedule(draw, impl)
    return dict(seed=draw(st.integers(0, 10_000)), img=img, patch=patch, stride=stride, depth=depth,
                embed_dim=draw(st.integers(2, 12)), d_state=draw(st.integers(1, 8)), batch=draw(st.integers(1, 3)),
                method=method, kwargs=kwargs)


def coverage_cases():
    """A fixed list of cases that reaches every registered method and flavour with each of its example options
    and every certified STM weight variant, for checks that need all of them at once."""
    geometries = [(16, 4, None), (11, 3, 2), (10, 4, 2)]
    cfg = VimConfig(img_size=16, patch_size=4, depth=3, embed_dim=8, d_state=4)
    kwargs = [("stm", dict(weights=w, sides=("both", "left", "right")[n % 3], positions=("ends", "uniform")[n % 2]))
              for n, w in enumerate(STM_WEIGHTS)]
    kwargs += [(n, dict(o)) for n, f in dict.fromkeys(DRAWN) if n != "none"
               for o in method_class(n, f).example_options(3) if not (n == "stm" and "weights" in o)]
    out = []
    for i, (method, kw) in enumerate(kwargs):
        schedule = method_class(method, kw.get("flavour"))(cfg, **kw).example_schedule()
        img, patch, stride = geometries[i % len(geometries)] if schedule is None else geometries[0]
        out.append(dict(seed=i, img=img, patch=patch, stride=stride, depth=3, embed_dim=8, d_state=4, batch=2,
                        method=method, kwargs=kw if schedule is None else {**kw, "schedule": schedule}))
    return out


def model(case, dtype):
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


def inputs(case):
    g = torch.Generator().manual_seed(case["seed"] + 1)
    return torch.randn(case["batch"], 3, case["img"], case["img"], dtype=torch.float64, generator=g)


def reference(m, x, tokens=False):
    """The float64 reference's logits and, with ``tokens``, every image's final tokens (after the final norm)."""
    sd = {k: v.detach().double().numpy() for k, v in m.state_dict().items()}
    reduction = None if m.reduction is None else m.reduction.to_dict()
    logits = ref_vim.forward(sd, x.numpy(), reduction=reduction)
    if not tokens:
        return logits
    sdf = {k: np.asarray(v, dtype=np.float64) for k, v in sd.items()}
    return logits, np.stack([ref_vim.final_tokens(sdf, im, reduction=reduction, image_index=b)[0]
                             for b, im in enumerate(x.numpy())])


def logits(m, x, device, backend, amp=None, tokens=False):
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


def check_float64(case, device, backend):
    """The float64 property on one case (also run by the fast path's mutation tests)."""
    m = model(case, torch.float64)
    x = inputs(case)
    (got, got_tokens), (want, want_tokens) = logits(m, x, device, backend, tokens=True), reference(m, x, tokens=True)
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


def check_rate(case):
    """The rate property on one case."""
    m = model(case, torch.float64)
    seen = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1])) for layer in m.layers]
    with torch.no_grad():
        m(inputs(case))
    for h in hooks:
        h.remove()
    reported = m.reduction.rate if m.reduction is not None else 0.0
    assert abs(reported - (1 - sum(seen) / (len(seen) * seen[0]))) <= 1e-12
    if m.reduction is not None:
        assert list(m.reduction.tokens_per_layer) == seen
