"""The peers as their authors ran them: R-MeeTo's and ToP-ViM's released code as flavours of ``tome`` and
``top``. The flavours equal their float64 twins, and each documented difference to our paper-described
version (docs/peers.md) is shown where it is: the two versions differ exactly there."""

import numpy as np
import pytest
import torch

import stm_fast
from stm_fast.registry import MODEL_CONFIGS
from stm_ref import reduction as ref
from stm_ref import vim as ref_vim
from tests.builders import GEOMETRY, random_model

TOL = 1e-9

VIM_TI = MODEL_CONFIGS["vim_tiny"]


def _check(method, tokens, depth=5, **options):
    """max |logit difference| between a flavour in the fast model and its float64 twin, batch of 3."""
    img, patch, stride = GEOMETRY[tokens]
    m = random_model(tokens, img, patch, 8, depth, 4, stride=stride)
    stm_fast.reduce(m, method, **options)
    assert any(m.reduction.schedule), "the flavour must reduce for the comparison to mean something"
    x = torch.randn(3, 3, img, img, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    want = ref_vim.forward(sd, x.numpy(), reduction=m.reduction.to_dict())
    with torch.no_grad():
        got = m(x).numpy()
    assert np.abs(want - ref_vim.forward(sd, x.numpy())).max() > 1e-6
    return np.abs(got - want).max()


# ------------------------------------------------------------------------------- against the twins

@pytest.mark.parametrize("tokens, kw", [
    (17, dict(num_prune=3)), (26, dict(num_prune=3)), (10, dict(num_prune=2, compare=1)),
    (17, dict(num_prune=3, mode="prune")), (26, dict(num_prune=2, odd=True)),
])
def test_rmeeto_matches_reference(tokens, kw):
    err = _check("tome", tokens, flavour="rmeeto", **kw)
    assert err <= TOL, f"max |dlogit| {err:.3e}"


@pytest.mark.parametrize("tokens, kw", [
    (17, dict(layers=[0, 1])), (26, dict(layers=[0, 1])), (17, dict(layers=[1, 2], keep_ratio=0.6)), (10, dict(layers=[0]))])
def test_top_released_matches_reference(tokens, kw):
    err = _check("top", tokens, depth=4, flavour="released", **kw)
    assert err <= TOL, f"max |dlogit| {err:.3e}"


# ----------------------------------------------------------------------------------- R-MeeTo differences

def _tokens(L=9, cls=4, d=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((L, d)), rng.standard_normal((L, d)), {"cls": cls, "pos": np.arange(L), "size": np.ones(L)}


def test_rmeeto_measures_similarity_on_the_mixer_output_not_the_stream():
    """R-MeeTo's merges depend on the mixer output alone: another residual stream changes nothing; ours
    (metric: residual + mixer output) merges other tokens."""
    hidden, residual, state = _tokens(L=15, cls=7)
    other = np.random.default_rng(5).standard_normal(residual.shape) * 3
    pos = lambda step, r: list(step(3, hidden, r, state, None, {})[2]["pos"])  # noqa: E731
    assert pos(ref.rmeeto_step, residual) == pos(ref.rmeeto_step, other)
    assert pos(ref.tome_step, residual) != pos(ref.tome_step, other)


def test_rmeeto_splits_after_taking_the_class_token_out():
    """Odd length 9, class token at 4: R-MeeTo's sources are positions 0, 2 (even, left) and 5, 7 (odd, right of
    the class token: the parity shifts); ours are the even positions 0, 2, 6, 8 of the full sequence."""
    hidden, residual, state = _tokens()
    removed_rmeeto = set(range(9)) - set(ref.rmeeto_step(4, hidden, residual, state, None, {})[2]["pos"])
    removed_ours = set(range(9)) - set(ref.tome_step(4, hidden, residual, state, None, {})[2]["pos"])
    assert removed_rmeeto == {0, 2, 5, 7} and removed_ours == {0, 2, 6, 8}


def test_rmeeto_puts_the_class_token_back_by_proportion_not_where_it_belongs():
    """L = 9, class token at 4; tokens 5 and 7 are copies of 6 and 8, so those two sources merge (both right of
    the class token). Exactly, 4 tokens stay left of it; R-MeeTo re-inserts it at int(4 * 7 // 9) = 3, so a
    patch token from its left side ends up right of it. Ours keeps the exact place."""
    hidden, residual, state = _tokens()
    hidden[5], hidden[7] = hidden[6], hidden[8]
    _, _, s = ref.rmeeto_step(2, hidden, residual, state, None, {})
    assert set(range(9)) - set(s["pos"]) == {5, 7}
    assert s["cls"] == 3 and s["pos"][3] == 4 and list(s["pos"]) == [0, 1, 2, 4, 3, 6, 8]
    _, _, ours = ref.tome_step(2, hidden, hidden, state, None, {})
    assert ours["pos"][ours["cls"]] == 4 and ours["cls"] == sum(1 for p in ours["pos"] if p < 4)


@pytest.mark.parametrize("num_prune, compare, last, final, rate", [
    (5, 11, 71, 76, 0.1675), (10, 11, 21, 76, 0.2838), (11, 11, 11, 76, 0.3071), (15, 11, 0, 47, 0.4124),
    (20, 11, 0, 10, 0.5381), (5, 5, 5, 142, 0.1396)])
def test_rmeeto_released_schedule_on_vim_tiny(num_prune, compare, last, final, rate):
    """The released rule: num_prune before blocks 2..20 (clamped to (L-1)//2), the last merge taking the sequence
    to 197 - 11 * compare tokens (skipped when that is no merge): Vim-Ti with num_prune 5 ends at 76 tokens."""
    r = stm_fast.make_reduction(VIM_TI, "tome", flavour="rmeeto", num_prune=num_prune, compare=compare)
    merges = [i for i, k in enumerate(r.schedule) if k]
    assert merges[:10] == list(range(1, 21, 2)) and r.schedule[21] == last
    assert r.tokens_per_layer[-1] == final and r.rate == pytest.approx(rate, abs=5e-5)


def test_rmeeto_prune_mode_drops_instead_of_merging():
    hidden, residual, state = _tokens()
    hm, _, sm = ref.rmeeto_step(2, hidden, residual, state, None, {})
    hp, _, sp = ref.rmeeto_step(2, hidden, residual, state, None, {"mode": "prune"})
    assert list(sm["pos"]) == list(sp["pos"]) and not np.allclose(hm, hp)
    np.testing.assert_array_equal(hp, hidden[sp["pos"]]), "pruned: the kept tokens are untouched"
    assert list(sp["size"]) == [1.0] * len(sp["pos"])


# ---------------------------------------------------------------------------------- ToP-ViM differences

def _stats(y_backward_position_order, y_forward=None):
    yb = np.asarray(y_backward_position_order, dtype=float)
    return {"forward": {"y": np.zeros_like(yb) if y_forward is None else np.asarray(y_forward, float)},
            "backward": {"y": yb}}


def test_top_released_scores_in_scan_order_so_it_keeps_the_mirror_image():
    """Backward output largest at position 0: ours keeps position 0; the released code reads the scores in the
    backward scan's order and keeps the mirror position N - 1 - 0 = 6 instead."""
    yb = np.array([[9.0, 1, 2, 0, 3, 0.5, 0.1]])  # one channel, position order; class token at 3
    state = {"cls": 3, "pos": np.arange(7), "size": np.ones(7)}
    hidden = np.arange(14.0).reshape(7, 2)
    _, _, released = ref.top_released_step(4, hidden, hidden, state, _stats(yb), {"image_index": 0})
    _, _, ours = ref.top_step(4, hidden, hidden, state, _stats(yb), {})
    assert 0 in ours["pos"] and 0 not in released["pos"] and 6 in released["pos"]


def test_top_released_does_not_clip():
    """Scores symmetric under the mirror (so only the clipping differs): position 0 (and 6) has channels [5, -4],
    clipped 5 but raw 1; positions 1, 5 have [2, 0]. Keeping 2 patch tokens, ours keeps 0 and 6, the released
    code 1 and 5."""
    col = {0: [5.0, -4.0], 1: [2.0, 0.0], 2: [0.5, 0.0], 3: [0.0, 0.0]}
    yb = np.array([col[min(p, 6 - p)] for p in range(7)]).T
    state = {"cls": 3, "pos": np.arange(7), "size": np.ones(7)}
    hidden = np.arange(14.0).reshape(7, 2)
    _, _, released = ref.top_released_step(4, hidden, hidden, state, _stats(yb), {"image_index": 0})
    _, _, ours = ref.top_step(4, hidden, hidden, state, _stats(yb), {})
    assert sorted(set(ours["pos"]) - {3}) == [0, 6] and sorted(set(released["pos"]) - {3}) == [1, 5]


def test_top_released_uses_the_backward_branch_only():
    """The forward branch's output says keep position 5; ours listens, the released code reads only the
    backward branch (mirror-symmetric here, so the mirror plays no part)."""
    yb = np.array([[1.0, 2, 0.5, 0, 0.5, 2, 1]])
    yf = np.array([[0, 0, 0, 0, 0, 50.0, 0]])
    state = {"cls": 3, "pos": np.arange(7), "size": np.ones(7)}
    hidden = np.arange(14.0).reshape(7, 2)
    _, _, released = ref.top_released_step(4, hidden, hidden, state, _stats(yb, yf), {"image_index": 0})
    _, _, ours = ref.top_step(4, hidden, hidden, state, _stats(yb, yf), {})
    assert sorted(set(ours["pos"]) - {3}) == [1, 5]
    assert sorted(set(released["pos"]) - {3}) == [1, 5]
    yf2 = np.array([[0, 50.0, 0, 0, 0, 0, 0]])  # the forward branch changes its mind: the released choice does not
    assert list(ref.top_released_step(4, hidden, hidden, state, _stats(yb, yf2), {"image_index": 0})[2]["pos"]) == \
        list(released["pos"])
    assert 1 in ref.top_step(4, hidden, hidden, state, _stats(yb, yf2), {})[2]["pos"]


def test_top_released_masks_the_class_token_for_the_first_image_only():
    """A class token with the highest score: image 0 keeps one copy (inserted); other images select it as well
    and carry it twice, one patch token fewer."""
    yb = np.array([[0.1, 0.2, 0.3, 99.0, 0.4, 0.5, 0.6]])  # the class token (3, its own mirror) scores highest
    state = {"cls": 3, "pos": np.arange(7), "size": np.ones(7)}
    hidden = np.arange(14.0).reshape(7, 2)
    _, _, first = ref.top_released_step(2, hidden, hidden, state, _stats(yb), {"image_index": 0})
    _, _, other = ref.top_released_step(2, hidden, hidden, state, _stats(yb), {"image_index": 1})
    assert list(first["pos"]).count(3) == 1 and list(other["pos"]).count(3) == 2


def test_top_released_puts_the_class_token_in_the_middle():
    yb = np.array([[5.0, 4, 3, 0, 0.1, 0.2, 0.3]])  # the highest scores sit right of the class token in scan order
    state = {"cls": 3, "pos": np.arange(7), "size": np.ones(7)}
    hidden = np.arange(14.0).reshape(7, 2)
    _, _, s = ref.top_released_step(2, hidden, hidden, state, _stats(yb), {"image_index": 0})
    assert s["cls"] == 2 and s["pos"][2] == 3
    assert sum(1 for p in s["pos"] if p < 3) != 2, "not where it belongs: the kept tokens are all on one side"


def test_top_released_keeps_157_125_101_and_aligns_nothing():
    r = stm_fast.make_reduction(VIM_TI, "top", flavour="released")
    assert (r.tokens_per_layer[5], r.tokens_per_layer[10], r.tokens_per_layer[15]) == (157, 125, 101)
    assert r.rate == pytest.approx(0.3012, abs=1e-4)
    tokens = stm_fast.reduction.tokens.TokenState.start(1, 5, 2, "cpu", torch.float32)
    gapped = tokens.kept(torch.tensor([[0, 2, 4]]))
    assert r.impl.decay_scales(gapped) is None, "no hidden-state alignment in the released code"
    assert stm_fast.make_reduction(VIM_TI, "top", rate=0.3).impl.decay_scales(gapped) is not None


def test_flavours_are_named_options_and_the_paper_version_stays_the_default():
    assert stm_fast.make_reduction(VIM_TI, "tome", rate=0.2).options == {"layers": "every_other"}
    with pytest.raises(ValueError, match="unknown flavour 'rmeto'; its flavours: rmeeto"):
        stm_fast.make_reduction(VIM_TI, "tome", flavour="rmeto", num_prune=5)
    r = stm_fast.make_reduction(VIM_TI, "tome", flavour="rmeeto", rate=0.3)
    assert r.options["num_prune"] == 11 and abs(r.rate - 0.3) <= 0.01
