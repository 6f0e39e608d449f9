"""The embedded default: a small Vision Mamba on scikit-learn's handwritten digits (offline, shipped weights).

Data: ``sklearn.datasets.load_digits`` (1797 images, 8x8, values 0..16). Split: stratified, 360 test
images, ``random_state=0`` (``train_test_split``); the rest (1437) trains. Pixels are scaled to [-1, 1].
Model: bimamba v2 with a middle class token and RMSNorm as Vim, 1 channel, patch size 1 (64 patch tokens
+ class token = 65), embed_dim 16, depth 8, d_state 16 (~43k parameters).
"""

from __future__ import annotations

import os

import numpy as np
import torch

__all__ = ["DIGITS_CONFIG", "load_split", "shipped_checkpoints", "create_digits_model", "SEEDS"]

DIGITS_CONFIG = dict(img_size=8, patch_size=1, channels=1, embed_dim=16, depth=8, d_state=16, num_classes=10)
SEEDS = (0, 1, 2)
DATA_DIR = os.path.join(os.path.dirname(__file__), "data")


def load_split():
    """(x_train, y_train, x_test, y_test): float32 images (n, 1, 8, 8) in [-1, 1] and int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0 - 0.5) / 0.5
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target, test_size=360, stratify=d.target, random_state=0)
    t = lambda a: torch.as_tensor(a)[:, None]  # noqa: E731
    return t(x_tr), torch.as_tensor(y_tr, dtype=torch.long), t(x_te), torch.as_tensor(y_te, dtype=torch.long)


def checkpoint_path(seed):
    return os.path.join(DATA_DIR, f"vim_digits_seed{seed}.pth")


def shipped_checkpoints():
    """Paths of the shipped digits models, one per seed; a clear error if the package data is missing."""
    paths = [checkpoint_path(s) for s in SEEDS]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"the embedded digits models are missing ({', '.join(missing)}): reinstall the package, or recreate them "
            f"with `python -m stm_fast.train_tiny --seed S` for S in {SEEDS}")
    return paths


def create_digits_model(checkpoint=None, dtype=None):
    from .models import create_model

    return create_model("vim_tiny", checkpoint_path=checkpoint, dtype=dtype, **DIGITS_CONFIG)
