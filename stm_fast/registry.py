"""The model registry (timm-style names and their configurations), apart from the model and the builder."""

from __future__ import annotations

from .vim import VimConfig

__all__ = ["MODEL_CONFIGS", "ALIASES", "list_models", "canonical_name", "name_for", "describe"]

MODEL_CONFIGS = {
    "vim_tiny": VimConfig(embed_dim=192, depth=24),
    "vim_small": VimConfig(embed_dim=384, depth=24),
    "vim_base": VimConfig(embed_dim=768, depth=24),
    # hustvl's Vim-tiny+ / Vim-small+ (their README's names): fine-tuned on overlapping patches, 730 tokens
    "vim_tiny_plus": VimConfig(embed_dim=192, depth=24, stride=8),
    "vim_small_plus": VimConfig(embed_dim=384, depth=24, stride=8),
}
ALIASES = {  # hustvl/Vim's registry names
    "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_tiny",
    "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_small",
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2": "vim_base",
    "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_tiny_plus",
    "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_small_plus",
}


def list_models() -> list[str]:
    """Short names first, then the official registry names (aliases)."""
    return sorted(MODEL_CONFIGS) + sorted(ALIASES)


def canonical_name(name: str) -> str:
    """The short name of ``name`` (an alias resolves to its model); ValueError for an unknown name."""
    key = ALIASES.get(name, name)
    if key not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return key


def name_for(embed_dim, depth, num_patches=None) -> str | None:
    """The registered short name of a configuration with this width and depth (and patch count, when
    given: it tells the stride-8 "+" models from the plain ones), if any."""
    for name, cfg in MODEL_CONFIGS.items():
        if (cfg.embed_dim, cfg.depth) == (embed_dim, depth) and num_patches in (None, cfg.num_patches):
            return name
    return None


def describe(name: str) -> str:
    """One line about a registered model: width, depth, patches and tokens."""
    cfg = MODEL_CONFIGS[canonical_name(name)]
    return (f"embed_dim {cfg.embed_dim}, depth {cfg.depth}, patch {cfg.patch_size} stride {cfg.patch_stride} at "
            f"{cfg.img_size} px: {cfg.grid}x{cfg.grid} patches + class token = {cfg.num_tokens} tokens")
