"""``create_model`` (timm-style builder) for Vision Mamba; the names live in ``stm_fast.registry``."""

from __future__ import annotations

import os

import torch

from .checkpoint import load_into, read_state_dict
from .registry import MODEL_CONFIGS, canonical_name, list_models
from .vim import VisionMamba

__all__ = ["create_model", "list_models", "parse_overrides", "check_config", "OVERRIDES"]

OVERRIDES = ("img_size", "patch_size", "stride", "embed_dim", "depth", "d_state", "num_classes", "channels")


def parse_overrides(items: list[str]) -> dict[str, int]:
    """``["embed_dim=16", "depth=4"]`` (command-line KEY=INTEGER items) -> {"embed_dim": 16, "depth": 4}."""
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not v.strip().isdigit():
            raise ValueError(f"--override takes KEY=INTEGER, got {item!r}")
        if k not in OVERRIDES:
            raise ValueError(f"--override {item}: unknown key {k!r}; allowed: {', '.join(OVERRIDES)}")
        if int(v) < 1:
            raise ValueError(f"--override {item}: {k} must be a positive integer")
        out[k] = int(v)
    return out


def check_config(cfg) -> None:
    """ValueError unless every size is positive and a patch fits in the image. As the official PatchEmbed,
    the grid is (img_size - patch_size) // stride + 1 (its Conv2d floors): pixels past the last whole
    patch are not read."""
    for field in ("img_size", "patch_size", "stride", "embed_dim", "depth", "d_state", "channels"):
        if getattr(cfg, field) is not None and getattr(cfg, field) < 1:
            raise ValueError(f"{field} must be a positive integer, got {getattr(cfg, field)}")
    if cfg.img_size < cfg.patch_size:
        raise ValueError(f"img_size {cfg.img_size} is smaller than patch_size {cfg.patch_size}: no patch fits")


def create_model(name: str, checkpoint_path: str | os.PathLike | None = None, *, ema: bool = False,
                 checkpoint_key: str | None = None, dtype: torch.dtype | None = None, device=None,
                 **overrides: int) -> VisionMamba:
    """Build a Vision Mamba by name, optionally load a checkpoint, and return it in eval mode.

    ``name``: ``vim_tiny`` / ``vim_small`` / ``vim_base``, the stride-8 ``vim_tiny_plus`` / ``vim_small_plus``
    (730 tokens at 224 px), or an official registry name (``stm_fast.registry.ALIASES``).
    ``checkpoint_path``: an official hustvl/Vim ``.pth`` (state dict under ``model``; ``ema=True`` takes
    ``model_ema``), a bare state dict, or our own ``torch.save({'model': sd})``; loaded strictly.
    ``overrides``: img_size, patch_size, stride, embed_dim, depth, d_state, num_classes, channels.
    ``dtype``: parameter dtype (torch.float32 default; torch.float64 for exact comparisons).
    """
    key = canonical_name(name)
    bad = sorted(set(overrides) - set(OVERRIDES))
    if bad:
        raise TypeError(f"create_model: unknown override(s) {bad}; allowed: {', '.join(OVERRIDES)}")
    cfg = MODEL_CONFIGS[key].with_overrides(**overrides)
    check_config(cfg)
    model = VisionMamba(cfg)
    if dtype is not None:
        model = model.to(dtype)
    if checkpoint_path is not None:
        sd = read_state_dict(checkpoint_path, key=checkpoint_key, ema=ema)
        load_into(model, sd, source=f"checkpoint {checkpoint_path}")
    if device is not None:
        model = model.to(device)
    return model.eval()
