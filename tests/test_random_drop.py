"""stm_fast.reduction.random_drop: the random-dropping floor (its twin and its eval group are checked with every
method in tests/test_method_registry.py)."""

import numpy as np
import pytest
import torch
from scipy import stats

import stm_fast
from stm_fast.reduction.random_drop import RandomDrop
from stm_fast.reduction.tokens import TokenState
from stm_fast.vim import VimConfig

CFG = VimConfig(img_size=16, patch_size=4, embed_dim=8, depth=4, d_state=4, num_classes=5)  # 17 tokens


def _dropped(seed, L=17, k=4, batch=1):
    """The positions one step of ``random`` (seed) removes from L tokens, per image."""
    step = RandomDrop(CFG, seed=seed)
    tokens = TokenState.start(batch, L, (L - 1) // 2, "cpu", torch.float32)
    x = torch.arange(L, dtype=torch.float32)[None, :, None].expand(batch, L, 2).contiguous()
    out, after = step.step(0, k, x, tokens, None)
    assert torch.equal(out[..., 0].long(), after.pos), "the kept rows are the kept positions, in order"
    return [sorted(set(range(L)) - set(p.tolist())) for p in after.pos]


def test_every_token_but_the_class_token_is_dropped_equally_often():
    """Over 3,000 seeds the 16 patch tokens are each dropped about 4/16 of the time (chi-square goodness of fit),
    and the class token never."""
    counts = np.zeros(17)
    for seed in range(3000):
        for t in _dropped(seed)[0]:
            counts[t] += 1
    assert counts[8] == 0
    patch = np.delete(counts, 8)
    assert stats.chisquare(patch).pvalue > 1e-3, f"drop counts far from uniform: {patch.tolist()}"


def test_a_seed_fixes_the_draw_and_another_seed_changes_it():
    assert _dropped(3) == _dropped(3)
    assert len({tuple(_dropped(s)[0]) for s in range(20)}) > 15


def test_every_image_of_a_batch_draws_the_same_positions():
    dropped = _dropped(5, batch=3)
    assert dropped[0] == dropped[1] == dropped[2]


def test_a_bad_seed_is_refused_with_its_name():
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        stm_fast.make_reduction(CFG, "random", rate=0.2, seed=-1)


def test_it_stays_out_of_the_default_grid_and_reaches_every_rate_on_vim_tiny():
    from stm_fast.eval.groups import DEFAULT_GROUPS, GROUPS

    assert "random" in GROUPS and "random" not in DEFAULT_GROUPS
    cfg = stm_fast.registry.MODEL_CONFIGS["vim_tiny"]
    for rate in (0.15, 0.2, 0.3, 0.4):
        assert abs(stm_fast.make_reduction(cfg, "random", rate=rate).rate - rate) <= 0.01
