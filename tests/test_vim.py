"""stm_fast's Vision Mamba against the float64 oracle stm_ref.vim (issue: logits equal to 1e-9 in float64)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import stm_fast
import stm_fast.registry
from stm_fast import ssm
from stm_ref import vim as ref_vim
from tests.builders import random_model

CPU_BACKENDS = [b for b in ssm.available_backends("cpu")]


configs = st.tuples(
    st.integers(0, 10_000),
    st.sampled_from([(8, 4), (12, 4), (16, 4), (10, 2), (6, 3)]),  # M = 4, 9, 16, 25, 4 (odd M puts cls off-centre)
    st.integers(2, 12),  # embed_dim (dt_rank = ceil(d / 16) = 1)
    st.integers(1, 3),
    st.integers(1, 8),
)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=6)
@given(cfg=configs)
def test_float64_logits_match_reference(backend, cfg):
    """float64: max |logit difference| <= 1e-9 against stm_ref.vim for every backend on this machine."""
    seed, (img, patch), d, depth, N = cfg
    m = random_model(seed, img, patch, d, depth, N).set_scan_backend(backend)
    x = torch.randn(2, 3, img, img, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ref = ref_vim.forward({k: v.numpy() for k, v in m.state_dict().items()}, x.numpy())
    with torch.no_grad():
        y = m(x).numpy()
    assert np.abs(y - ref).max() <= 1e-9, f"max |dlogit| {np.abs(y - ref).max():.3e}"
    assert np.abs(ref).max() > 1e-3, "logits must be non-trivial for the comparison to mean something"


# (img, patch, stride): overlapping patches as hustvl's stride-8 "+" models, odd grids (class token off-centre)
STRIDED = [(10, 4, 2), (11, 3, 2), (13, 5, 4), (7, 3, 1), (12, 4, 4)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("img,patch,stride", STRIDED)
def test_float64_logits_match_reference_with_overlapping_patches(backend, img, patch, stride):
    """float64: stride < patch size (and odd grids: 5 x 5, 3 x 3) gives the reference's logits to 1e-9; the
    reference reads the stride off the image size and takes every patch explicitly."""
    m = random_model(img + stride, img, patch, 8, 2, 4, stride=stride).set_scan_backend(backend)
    assert m.cfg.grid == (img - patch) // stride + 1 and m.pos_embed.shape[1] == m.cfg.grid ** 2 + 1
    x = torch.randn(2, 3, img, img, dtype=torch.float64, generator=torch.Generator().manual_seed(img))
    ref = ref_vim.forward({k: v.numpy() for k, v in m.state_dict().items()}, x.numpy())
    with torch.no_grad():
        y = m(x).numpy()
    assert np.abs(y - ref).max() <= 1e-9, f"max |dlogit| {np.abs(y - ref).max():.3e}"
    assert np.abs(ref).max() > 1e-3


def test_stride_8_models_have_730_tokens_and_their_class_token_at_364():
    """hustvl's Vim-tiny+ / Vim-small+: patch 16, stride 8 at 224 px: a 27 x 27 grid, 729 patches + class token."""
    for name, alias in (("vim_tiny_plus", "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"),
                        ("vim_small_plus", "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2")):
        cfg = stm_fast.registry.MODEL_CONFIGS[stm_fast.registry.canonical_name(alias)]
        assert stm_fast.registry.canonical_name(alias) == name
        assert (cfg.patch_size, cfg.patch_stride, cfg.grid, cfg.num_tokens, cfg.cls_position) == (16, 8, 27, 730, 364)
    m = stm_fast.create_model("vim_tiny_plus")
    assert m.patch_embed.proj.stride == (8, 8) and m.pos_embed.shape == (1, 730, 192)


@settings(max_examples=6)
@given(cfg=configs)
def test_float32_logits_within_1e4_relative(cfg):
    """float32 model vs float64 reference: max |dlogit| / max |logit| <= 1e-4."""
    seed, (img, patch), d, depth, N = cfg
    m64 = random_model(seed, img, patch, d, depth, N)
    m32 = stm_fast.create_model("vim_tiny", img_size=img, patch_size=patch, embed_dim=d, depth=depth, d_state=N, num_classes=7)
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    x = torch.randn(2, 3, img, img, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ref = ref_vim.forward({k: v.numpy() for k, v in m64.state_dict().items()}, x.numpy())
    with torch.no_grad():
        y = m32(x.float()).double().numpy()
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


def test_bf16_autocast_runs_and_stays_close():
    """bf16 autocast (CPU): logits within 5% of the logit scale of the float64 reference (bf16 keeps 8 mantissa bits;
    the residual stream and the scan stay in float32, so the error does not grow with depth)."""
    m64 = random_model(3, 16, 4, 16, 4, 8)
    m32 = stm_fast.create_model("vim_tiny", img_size=16, patch_size=4, embed_dim=16, depth=4, d_state=8, num_classes=7)
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = ref_vim.forward({k: v.numpy() for k, v in m64.state_dict().items()}, x.numpy())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = m32(x.float())
    assert y.dtype == torch.bfloat16
    err = np.abs(y.double().numpy() - ref).max() / np.abs(ref).max()
    assert err <= 5e-2, f"bf16 relative logit error {err:.3e}"


def test_class_token_sits_in_the_middle_and_moves_the_output():
    """docs/conventions.md §2: the class token is inserted at M // 2, and the head reads that position."""
    m = random_model(0, 12, 4, 8, 2, 4)
    assert m.token_position == 9 // 2
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    emb = m.embed(x)
    assert emb.shape[1] == 10
    torch.testing.assert_close(emb[0, 4], (m.cls_token[0, 0] + m.pos_embed[0, 4]).to(emb.dtype))


def test_a_stride_that_does_not_reach_the_edge_matches_the_reference():
    """img_size 40, patch 8, stride 6: (40 - 8) // 6 + 1 = 6 patches per side, the last 2 pixels unread, as
    the official PatchEmbed; float64 logits equal the reference given the same stride, to 1e-9."""
    m = random_model(0, 40, 8, 8, 2, 4, stride=6)
    assert m.cfg.grid == 6 and m.cfg.num_tokens == 37
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        y = m(x).numpy()
    ref = ref_vim.forward({k: v.numpy() for k, v in m.state_dict().items()}, x.numpy(), stride=6)
    assert np.abs(y - ref).max() <= 1e-9
