"""stm_fast.reduce against the float64 oracle stm_ref.vim + stm_ref.reduction, case by case.

Each case builds a small random float64 Vim (``tests.builders.random_model``), reduces it with
``stm_fast.reduce(model, method, schedule=...)`` and compares its logits with
``stm_ref.vim.forward(sd, x, reduction=model.reduction.to_dict())``, which runs the same reduction one image at a
time in float64 NumPy: max |logit difference| <= 1e-9. Geometries from ``tests.builders.GEOMETRY``: 16x16 images
with 4x4 patches (17 tokens, class token at 8), 12x12 with 4x4 patches (10 tokens, class token at 4,
off-centre) and overlapping patches. A few hand-built cases pin the reference steps themselves
(``stm_ref.reduction``) to the semantics the fast methods document. Every registered method's example options
are compared the same way in tests/test_method_registry.py.
"""

import numpy as np
import pytest
import torch

import stm_fast
from stm_ref import reduction as reductions
from stm_ref.reduction import evit as ref_evit
from stm_ref import vim as ref_vim
from tests.builders import GEOMETRY, random_model

TOL = 1e-9


def _case(method, tokens, schedule, seed=0, embed_dim=8, d_state=4, batch=3, backend=None, **options):
    """(fast logits, reference logits, unreduced reference logits, model) for one configuration."""
    img, patch, stride = GEOMETRY[tokens]
    depth = len(schedule) + 1
    m = random_model(seed, img, patch, embed_dim, depth, d_state, stride=stride)
    m.set_scan_backend(backend)
    stm_fast.reduce(m, method, schedule=schedule, **options)
    assert m.reduction.schedule == tuple(schedule)
    x = torch.randn(batch, 3, img, img, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    ref = ref_vim.forward(sd, x.numpy(), reduction=m.reduction.to_dict())
    plain = ref_vim.forward(sd, x.numpy())
    with torch.no_grad():
        y = m(x).numpy()
    return y, ref, plain, m


def _check(method, tokens, schedule, **kw):
    y, ref, plain, _ = _case(method, tokens, schedule, **kw)
    err = np.abs(y - ref).max()
    assert np.abs(ref).max() > 1e-3, "logits must be non-trivial for the comparison to mean something"
    assert np.abs(ref - plain).max() > 1e-6, "the reduction must change the logits for the comparison to mean something"
    return err


# ------------------------------------------------------------------------------------- overlapping patches

@pytest.mark.parametrize("method, schedule, options", [
    ("stm", [6, 4, 0], {}), ("stm", [0, 3, 2], dict(sides="right", positions="uniform")), ("stm", [2, 2, 2], dict(sides="left")),
    ("tome", [5, 4, 2], dict(layers="all")), ("top", [6, 5, 0], dict(layers=[0, 1])), ("evit", [5, 4, 3], dict(layers=[0, 1, 2])),
    ("mtr", [5, 4, 3], dict(layers=[0, 1, 2])),
])
def test_every_method_matches_reference_with_overlapping_patches(method, schedule, options):
    """A stride smaller than the patch (hustvl's "+" models) on an odd grid: every method equals the float64
    reference, whose patch embedding takes each overlapping patch explicitly."""
    err = _check(method, 26, schedule, **options)
    assert err <= TOL, f"max |dlogit| {err:.3e}"


# ------------------------------------------------------------------------------------------------- stm

@pytest.mark.parametrize("tokens, schedule, options", [
    (17, [4, 2, 0], {}),  # sides='both', positions='ends', weights='lsq'
    (17, [14, 0], {}),  # the most one step can take: 7 per side
    (10, [2, 1, 0], dict(sides="right", positions="uniform", weights="mean")),
    (10, [0, 2, 1], dict(sides="left", weights="decay", start_layer=1)),
    (17, [4, 2, 2], dict(weights="size")),  # merged tokens merge again: sizes carried
    (10, [2, 1, 1], dict(sides="right", positions="uniform", weights="size")),
    (17, [6, 4, 0], dict(weights="lsq_joint")),  # 3 and 2 per side: the joint fit is a 3x3 / 2x2 solve
    (17, [0, 3, 2], dict(sides="left", weights="lsq_joint")),
    (17, [4, 2, 2], dict(weights="noise")),  # the positive control: merged tokens replaced by seeded noise
    (10, [2, 1, 1], dict(sides="right", positions="uniform", weights="noise")),
])
def test_stm_matches_reference(tokens, schedule, options):
    err = _check("stm", tokens, schedule, **options)
    assert err <= TOL, f"max |dlogit| {err:.3e}"


@pytest.mark.parametrize("tokens, schedule, options", [
    (17, [4, 2, 0], {}),
    (17, [0, 4, 2], dict(sides="left", weights="lsq_norm")),
    (10, [2, 2, 0], dict(weights="mean")),
    (17, [4, 4, 0], dict(weights="lsq_joint")),
])
def test_stm_without_the_scans_exported_steps_matches_reference(tokens, schedule, options):
    """The loop backend exports no first-step delta/Abar (only the torch backend does, as on GPU the
    Triton and mamba-ssm kernels do not): STM recomputes them from the layer statistics, same result."""
    err = _check("stm", tokens, schedule, backend="loop", **options)
    assert err <= TOL, f"max |dlogit| {err:.3e}"


# ------------------------------------------------------------------------------------------------ tome

@pytest.mark.parametrize("tokens, schedule, options", [
    (17, [8, 0], dict(layers=[0])),  # one step at its maximum: every even token but the class token merges
    (10, [0, 4], dict(layers=[1])),  # off-centre class token (4, even), maximum 4 sources
    (17, [4, 2, 2], dict(layers="all")),  # merged tokens merge again: sizes carried
    (10, [3, 2, 1], dict(layers="all")),
    (17, [0, 3, 0, 2], dict(layers="every_other")),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_tome_matches_reference(tokens, schedule, options, seed):
    err = _check("tome", tokens, schedule, seed=seed, **options)
    assert err <= TOL, f"max |dlogit| {err:.3e}"


def test_tome_reference_step_by_hand():
    """5 tokens, class token at 2 (even: not a source); sources 0, 4, destinations 1, 3 (sizes 1, 1, 1, 2, 1)."""
    e = np.eye(3)
    residual = np.stack([e[0] + 0.1 * e[1], e[0], e[2] * 7, e[1], e[1] + 0.5 * e[0]])
    hidden = np.zeros_like(residual)
    state = {"cls": 2, "pos": np.array([0, 3, 5, 6, 9]), "size": np.array([1.0, 1.0, 1.0, 2.0, 1.0])}
    # best partners: 0 -> 1 (cos 0.995), 4 -> 3 (cos 0.894); k = 1 merges 0 into 1
    h, r, s = reductions.tome_step(1, hidden, residual, state, None, {})
    np.testing.assert_allclose(r, np.stack([(residual[0] + residual[1]) / 2, residual[2], residual[3], residual[4]]))
    assert s["cls"] == 1 and list(s["pos"]) == [3, 5, 6, 9] and list(s["size"]) == [2.0, 1.0, 2.0, 1.0]
    # k = 2 also merges 4 into 3, weighted by sizes (3 has size 2)
    h, r, s = reductions.tome_step(2, hidden, residual, state, None, {})
    np.testing.assert_allclose(r[2], (2 * residual[3] + residual[4]) / 3)
    assert list(s["size"]) == [2.0, 1.0, 3.0] and s["cls"] == 1
    with pytest.raises(ValueError):
        reductions.tome_step(3, hidden, residual, state, None, {})


# ------------------------------------------------------------------------------------------------- top

@pytest.mark.parametrize("tokens, schedule, options", [
    (17, [15, 0], dict(layers=[0])),  # one step at its maximum: the class token and one other remain
    (17, [5, 4, 3], dict(layers=[0, 1, 2])),
    (10, [0, 3, 3], dict(layers=[1, 2])),
    (10, [2, 2, 2], dict(layers=[0, 1, 2], align=False)),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_top_matches_reference(tokens, schedule, options, seed):
    err = _check("top", tokens, schedule, seed=seed, **options)
    assert err <= TOL, f"max |dlogit| {err:.3e}"


def test_top_alignment_changes_the_logits_and_matches_reference():
    """align=True decays Abar over the pruned gaps in the layers after a pruning; align=False does not."""
    out = {}
    for align in (True, False):
        y, ref, _, m = _case("top", 17, [6, 4, 0], layers=[0, 1], align=align)
        assert m.reduction.options["align"] is align
        assert np.abs(y - ref).max() <= TOL, f"align={align}: max |dlogit| {np.abs(y - ref).max():.3e}"
        out[align] = (y, ref)
    assert np.abs(out[True][1] - out[False][1]).max() > 1e-6  # the reference sees the alignment ...
    assert np.abs(out[True][0] - out[False][0]).max() > 1e-6  # ... and so does the fast model


def test_top_reference_scales_by_hand():
    state = {"cls": 1, "pos": np.array([0, 2, 3, 7]), "size": np.ones(4)}
    fwd, bwd = reductions.twin_for("top", {"align": True}).decay_scales(state)
    assert list(fwd) == [1, 2, 1, 4] and list(bwd) == [2, 1, 4, 1]
    assert reductions.twin_for("top", {}).decay_scales(state) is not None  # align defaults to True
    assert reductions.twin_for("top", {"align": False}).decay_scales(state) is None
    assert reductions.twin_for("top", {"align": True}).decay_scales({**state, "pos": np.arange(4)}) is None  # nothing pruned
    assert reductions.twin_for("tome", {}).decay_scales(state) is None
    assert reductions.twin_for("top", {"flavour": "released"}).decay_scales(state) is None  # the released code aligns nothing


def test_top_reference_step_by_hand():
    """Importance = sum of max(y, 0) over channels and both directions; the class token stays even if least important."""
    y_f = np.array([[1.0, -5.0, 0.2, 3.0, -1.0], [0.5, -1.0, 0.1, -2.0, 0.3]])
    y_b = np.array([[0.0, -1.0, 0.0, 0.1, 2.0], [0.0, -1.0, 0.0, 0.0, -1.0]])
    stats = {"forward": {"y": y_f}, "backward": {"y": y_b}}
    np.testing.assert_allclose(reductions.top_importance(stats), [1.5, 0.0, 0.3, 3.1, 2.3])
    hidden = np.arange(10.0).reshape(5, 2)
    state = {"cls": 1, "pos": np.array([0, 1, 4, 5, 8]), "size": np.ones(5)}
    h, r, s = reductions.top_step(2, hidden, hidden + 1, state, stats, {})
    np.testing.assert_array_equal(h, hidden[[1, 3, 4]])
    assert s["cls"] == 0 and list(s["pos"]) == [1, 5, 8]


# ------------------------------------------------------------------------------------------------ evit

@pytest.mark.parametrize("tokens, schedule, options", [
    (17, [14, 0], dict(layers=[0])),  # one step at its maximum: 15 tokens fused into one, 3 remain
    (17, [5, 4, 3], dict(layers=[0, 1, 2])),
    (10, [3, 2, 2], dict(layers=[0, 1, 2])),
    (10, [0, 4, 0], dict(layers=[1])),
])
def test_evit_matches_reference(tokens, schedule, options):
    err = _check("evit", tokens, schedule, **options)
    assert err <= TOL, f"max |dlogit| {err:.3e}"


def test_evit_reference_class_attention_by_hand():
    """class_attention against eq. 5 written out: C_cls . exp(A * sum of the deltas between) . delta_j B_j."""
    rng = np.random.default_rng(0)
    E, N, L, cls = 3, 2, 6, 2
    stats = {d: {"delta": rng.uniform(0.1, 1.0, (E, L)), "B": rng.normal(size=(N, L)), "C": rng.normal(size=(N, L)),
                 "A": -rng.uniform(0.5, 2.0, (E, N))} for d in ("forward", "backward")}
    want = np.zeros(L)
    for j in range(L):
        if j == cls:
            continue
        s = stats["forward" if j < cls else "backward"]
        between = range(j + 1, cls + 1) if j < cls else range(cls, j)
        S = sum(s["delta"][:, k] for k in between)  # (E,)
        alpha = np.sum(s["C"][:, cls][None] * np.exp(s["A"] * S[:, None]) * s["B"][:, j][None], axis=1) * s["delta"][:, j]
        want[j] = np.mean(np.abs(alpha))
    np.testing.assert_allclose(reductions.class_attention(stats, cls), want, rtol=1e-13, atol=0)


def test_evit_reference_step_by_hand(monkeypatch):
    imp = np.array([0.3, 0.1, 0.0, 0.2, 0.5])
    monkeypatch.setattr(ref_evit, "class_attention", lambda stats, cls: imp)
    hidden = np.arange(10.0).reshape(5, 2)
    state = {"cls": 2, "pos": np.arange(5), "size": np.ones(5)}
    # k = 2: the 3 least important (1, 3, 0) fuse into 0, the most important of them
    h, r, s = reductions.evit_step(2, hidden, 2 * hidden, state, None, {})
    fused = (0.1 * hidden[1] + 0.2 * hidden[3] + 0.3 * hidden[0]) / 0.6
    np.testing.assert_allclose(h, np.stack([fused, hidden[2], hidden[4]]))
    np.testing.assert_allclose(r, 2 * h)
    assert s["cls"] == 1 and list(s["pos"]) == [0, 2, 4]


# ------------------------------------------------------------------------------------------------- mtr

@pytest.mark.parametrize("tokens, schedule, options", [
    (17, [5, 4, 3], dict(layers=[0, 1, 2])),
    (17, [6, 0], dict(layers=[0])),
    (10, [3, 2, 2], dict(layers=[0, 1, 2], keep_frac=0.0)),  # no Keep group: every other token is a Target
    (17, [4, 3, 0], dict(layers=[0, 1], keep_frac=0.75)),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_mtr_matches_reference(tokens, schedule, options, seed):
    err = _check("mtr", tokens, schedule, seed=seed, **options)
    assert err <= TOL, f"max |dlogit| {err:.3e}"


def test_mtr_reference_step_by_hand():
    """6 tokens, class token at 2. Importance (mean Delta of both directions): [5, 1, 0, 2, 6, 0.5] (the class
    token's own value is ignored). k = 2: Sources = the two least important (5 then 1), of the remaining
    3 patch tokens ceil(0.5 * 3) = 2 are kept (4, 0) and token 3 is the only Target: it becomes the mean of
    tokens 3, 5 and 1; order kept."""
    delta_f = np.array([[5.0, 1.0, 9.0, 2.0, 6.0, 0.5]])
    stats = {"forward": {"delta": delta_f}, "backward": {"delta": np.zeros((1, 6))}}
    np.testing.assert_allclose(reductions.mtr_importance(stats), delta_f[0])
    hidden = np.arange(12.0).reshape(6, 2)
    state = {"cls": 2, "pos": np.arange(6), "size": np.ones(6)}
    h, r, s = reductions.mtr_step(2, hidden, hidden + 1, state, stats, {"keep_frac": 0.5})
    np.testing.assert_allclose(h, np.stack([hidden[0], hidden[2], (hidden[3] + hidden[5] + hidden[1]) / 3, hidden[4]]))
    np.testing.assert_allclose(r, h + 1)
    assert s["cls"] == 1 and list(s["pos"]) == [0, 2, 3, 4]


# ---------------------------------------------------------------------------------------- regression

def test_tome_never_merges_into_the_class_token():
    """17 tokens, [8, 4, 2] after layers 0-2 (each step the most ToMe can take): 17 -> 9 -> 5 -> 3, and the
    class token is never a source nor a destination, so it always stands for itself alone (size 1)."""
    m = random_model(0, 16, 4, 8, 4, 4)
    stm_fast.reduce(m, "tome", schedule=[8, 4, 2], layers="all")
    sizes = []

    def spy(step, args):
        out = step(*args)
        new = out[1]
        sizes.append(new.size[torch.arange(new.size.shape[0]), new.cls])
        return out

    m.reduction = m.reduction.with_step_hook(spy)
    with torch.no_grad():
        m(torch.randn(64, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert len(sizes) == 3 and all(bool((s == 1).all()) for s in sizes), f"class-token sizes after each step: {sizes}"
