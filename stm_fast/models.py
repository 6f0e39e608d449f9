"""``create_model`` (timm-style builder) for Vision Mamba; the names live in ``stm_fast.registry``."""

from __future__ import annotations

import os

import torch

from .checkpoint import load_into, read_state_dict
from .registry import MODEL_CONFIGS, canonical_name, list_models
from .vim import VisionMamba

__all__ = ["create_model", "list_models", "parse_overrides"]

_OVERRIDES = ("img_size", "patch_size", "embed_dim", "depth", "d_state", "num_classes", "channels")


def parse_overrides(items: list[str]) -> dict[str, int]:
    """``["embed_dim=16", "depth=4"]`` (command-line KEY=INTEGER items) -> {"embed_dim": 16, "depth": 4}."""
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not v.isdigit():
            raise ValueError(f"--override takes KEY=INTEGER, got {item!r}")
        out[k] = int(v)
    return out


def create_model(name: str, checkpoint_path: str | os.PathLike | None = None, *, ema: bool = False,
                 checkpoint_key: str | None = None, dtype: torch.dtype | None = None, device=None,
                 **overrides: int) -> VisionMamba:
    """Build a Vision Mamba by name, optionally load a checkpoint, and return it in eval mode.

    ``name``: ``vim_tiny`` / ``vim_small`` / ``vim_base`` or an official registry name.
    ``checkpoint_path``: an official hustvl/Vim ``.pth`` (state dict under ``model``; ``ema=True`` takes
    ``model_ema``), a bare state dict, or our own ``torch.save({'model': sd})``; loaded strictly.
    ``overrides``: img_size, patch_size, embed_dim, depth, d_state, num_classes, channels.
    ``dtype``: parameter dtype (torch.float32 default; torch.float64 for exact comparisons).
    """
    key = canonical_name(name)
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
