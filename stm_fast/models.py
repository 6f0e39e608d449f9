"""Model registry and ``create_model`` (timm-style) for Vision Mamba."""

from __future__ import annotations

from .checkpoint import load_into, read_state_dict
from .vim import VimConfig, VisionMamba

__all__ = ["create_model", "list_models", "MODEL_CONFIGS", "ALIASES", "name_for", "parse_overrides"]

MODEL_CONFIGS = {
    "vim_tiny": VimConfig(embed_dim=192, depth=24),
    "vim_small": VimConfig(embed_dim=384, depth=24),
    "vim_base": VimConfig(embed_dim=768, depth=24),
}
ALIASES = {
    "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_tiny",
    "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_small",
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2": "vim_base",
}
_OVERRIDES = ("img_size", "patch_size", "embed_dim", "depth", "d_state", "num_classes", "channels")


def parse_overrides(items):
    """``["embed_dim=16", "depth=4"]`` (command-line KEY=INTEGER items) -> {"embed_dim": 16, "depth": 4}."""
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not v.isdigit():
            raise ValueError(f"--override takes KEY=INTEGER, got {item!r}")
        out[k] = int(v)
    return out


def list_models():
    return sorted(MODEL_CONFIGS) + sorted(ALIASES)


def name_for(embed_dim, depth):
    for name, cfg in MODEL_CONFIGS.items():
        if cfg.embed_dim == embed_dim and cfg.depth == depth:
            return name
    return None


def create_model(name, checkpoint_path=None, *, ema=False, checkpoint_key=None, dtype=None, device=None,
                 **overrides):
    """Build a Vision Mamba by name, optionally load a checkpoint, and return it in eval mode.

    ``name``: ``vim_tiny`` / ``vim_small`` / ``vim_base`` or an official registry name.
    ``checkpoint_path``: an official hustvl/Vim ``.pth`` (state dict under ``model``; ``ema=True`` takes
    ``model_ema``), a bare state dict, or our own ``torch.save({'model': sd})``; loaded strictly.
    ``overrides``: img_size, patch_size, embed_dim, depth, d_state, num_classes, channels.
    ``dtype``: parameter dtype (torch.float32 default; torch.float64 for exact comparisons).
    """
    key = ALIASES.get(name, name)
    if key not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    bad = sorted(set(overrides) - set(_OVERRIDES))
    if bad:
        raise TypeError(f"create_model: unknown override(s) {bad}; allowed: {', '.join(_OVERRIDES)}")
    cfg = MODEL_CONFIGS[key].with_overrides(**overrides)
    if cfg.img_size % cfg.patch_size:
        raise ValueError(f"img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}")
    model = VisionMamba(cfg)
    if dtype is not None:
        model = model.to(dtype)
    if checkpoint_path is not None:
        sd = read_state_dict(checkpoint_path, key=checkpoint_key, ema=ema)
        load_into(model, sd, source=f"checkpoint {checkpoint_path}")
    if device is not None:
        model = model.to(device)
    return model.eval()
