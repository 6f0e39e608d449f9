"""The model registry (timm-style names and their configurations), apart from the model and the builder."""

from __future__ import annotations

from .vim import VimConfig

__all__ = ["MODEL_CONFIGS", "ALIASES", "list_models", "canonical_name", "name_for"]

MODEL_CONFIGS = {
    "vim_tiny": VimConfig(embed_dim=192, depth=24),
    "vim_small": VimConfig(embed_dim=384, depth=24),
    "vim_base": VimConfig(embed_dim=768, depth=24),
}
ALIASES = {  # hustvl/Vim's registry names
    "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_tiny",
    "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_small",
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2": "vim_base",
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


def name_for(embed_dim, depth) -> str | None:
    """The registered short name of a configuration with this width and depth, if any."""
    for name, cfg in MODEL_CONFIGS.items():
        if cfg.embed_dim == embed_dim and cfg.depth == depth:
            return name
    return None
