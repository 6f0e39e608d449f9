"""The embedded testbeds: small Vision Mambas on scikit-learn's handwritten digits (offline, shipped weights).

Data: ``sklearn.datasets.load_digits`` (1797 images, 8x8, values 0..16). Split: stratified, 360 test
images, ``random_state=0`` (``train_test_split``); the rest (1437) trains. Pixels are scaled to [-1, 1].
Two testbeds (docs/testbeds.md says why each is built as it is):

* ``digits`` (the fast default): the 8x8 images as they are, patch size 1 (64 patch tokens + class token
  = 65), embed_dim 16, depth 8, d_state 16 (~43k parameters).
* ``paper-geometry``: Vim-Ti's token geometry, 14 x 14 patches + a middle class token = 197 tokens and 24
  layers. Each digit is stretched so that its ink's bounding box fills a 28 x 28 frame (``fill_frame``),
  so strokes reach all four borders and the outermost tokens, the ones STM merges first, carry the
  digit; patch 2 gives the 14 x 14 grid; embed_dim 32, d_state 16 (~336k parameters).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .registry import MODEL_CONFIGS

__all__ = ["DIGITS_CONFIG", "PAPER_GEOMETRY_CONFIG", "FASHION_MNIST_CONFIG", "load_test_split", "Testbed", "TESTBEDS", "testbed", "load_split",
           "fill_frame", "shipped_checkpoints", "checkpoint_path", "create_digits_model", "SEEDS"]

DIGITS_CONFIG = dict(img_size=8, patch_size=1, channels=1, embed_dim=16, depth=8, d_state=16, num_classes=10)
PAPER_GEOMETRY_CONFIG = dict(img_size=28, patch_size=2, channels=1, embed_dim=32, depth=24, d_state=16, num_classes=10)
FASHION_MNIST_CONFIG = dict(img_size=28, patch_size=2, channels=1, embed_dim=32, depth=12, d_state=16, num_classes=10)
FASHION_SEEDS = (0, 1, 2, 3, 4)  # the five shipped models (docs/testbeds.md)
SEEDS = (0, 1, 2)
# fashion-mnist's default eval (docs/testbeds.md): every method group at 20%, the paper's headline column (its
# Table 2), where the claims are tested, and STM alone at the other rates and at schedule 4 (two tokens per
# direction per layer), the regime rows that stand beside the paper's Vim-Ti figures; every group at every
# rate would take about 3.5 h on two cores
FASHION_EVAL_GRID = ((None, (0.2,), None), (("stm",), (0.15, 0.3, 0.4), None), (("stm",), (), 4))
DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
INK = 2  # of 16: a pixel above this is ink (the bounding box of ``fill_frame``)
JITTER = 0.6  # source pixels: how far paper-geometry's training moves each edge of the frame


def fill_frame(images, size: int, jitter: float = 0.0, rng=None) -> torch.Tensor:
    """Each 8x8 digit (values 0..16) stretched so that its ink's bounding box fills a size x size frame,
    bilinearly, scaled to [-1, 1]: (n, 1, size, size) float32. ``jitter``: each edge of the box moved by
    up to that many source pixels (uniform, from ``rng``), which zooms, shifts and cuts strokes at the
    border: the training augmentation."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32) / 16.0
    n = x.shape[0]
    ink = x > INK / 16.0
    idx = torch.arange(8, dtype=torch.float32)
    rows, cols = ink.any(2), ink.any(1)
    edges = [torch.where(rows, idx, 99.0).amin(1), torch.where(rows, idx, -99.0).amax(1) + 1,
             torch.where(cols, idx, 99.0).amin(1), torch.where(cols, idx, -99.0).amax(1) + 1]
    box = torch.stack(edges, 1)  # (n, 4): top, bottom, left, right in source pixel edges
    if jitter:
        box = box + torch.as_tensor(rng.uniform(-jitter, jitter, (n, 4)), dtype=torch.float32)
    t = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # output pixel centres in [0, 1]
    ys = box[:, :1] + t * (box[:, 1:2] - box[:, :1])
    xs = box[:, 2:3] + t * (box[:, 3:4] - box[:, 2:3])
    grid = torch.stack([(xs / 4 - 1)[:, None, :].expand(n, size, size), (ys / 4 - 1)[:, :, None].expand(n, size, size)], -1)
    out = F.grid_sample(x[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out * 2 - 1


def raw_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    return train_test_split(d.images, d.target, test_size=360, stratify=d.target, random_state=0)


def _digits_train(data_dir=None):
    x_tr, _, y_tr, _ = raw_split()
    return x_tr, torch.as_tensor(y_tr, dtype=torch.long)


def _digits_test():
    _, x_te, _, y_te = raw_split()
    return x_te, torch.as_tensor(y_te, dtype=torch.long)


def load_split(testbed_name: str = "digits", data_dir: str | None = None):
    """(x_train, y_train, x_test, y_test) of a testbed: float32 images (n, 1, s, s) in [-1, 1] and int64
    labels; the training images unaugmented. ``data_dir``: where a testbed that ships only its test images
    (fashion-mnist) finds its training files."""
    bed = testbed(testbed_name)
    raw_tr, y_tr = bed.read_train(data_dir)
    return (bed.prepare(raw_tr), y_tr, *load_test_split(testbed_name))


def load_test_split(testbed_name: str = "digits"):
    """(x_test, y_test) of a testbed, prepared as in ``load_split``; what the embedded eval scores."""
    bed = testbed(testbed_name)
    raw_te, y_te = bed.read_test()
    return bed.prepare(raw_te), y_te


def _scaled(images):
    """The 8x8 digits as they are, scaled to [-1, 1]: (n, 1, 8, 8)."""
    return torch.as_tensor((np.asarray(images).astype(np.float32) / 16.0 - 0.5) / 0.5)[:, None]


def _framed(images):
    return fill_frame(images, PAPER_GEOMETRY_CONFIG["img_size"])


def _shifted(x_raw, idx, x_ready, rng):
    """A digits training batch: each prepared image shifted by up to one pixel each way, -1 (zero) fill."""
    x = x_ready[idx]
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = rng.integers(0, 3, n), rng.integers(0, 3, n)
    return torch.stack([padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8] for i in range(n)])


def _jittered(x_raw, idx, x_ready, rng):
    """A paper-geometry training batch: the frame of each raw digit re-cut with its edges jittered."""
    return fill_frame(x_raw[idx.numpy()], PAPER_GEOMETRY_CONFIG["img_size"], JITTER, rng)


def _fashion_train(data_dir=None):
    from .fashion_mnist import DEBIAN_DIR, read_split

    return read_split(True, data_dir or DEBIAN_DIR)


def _fashion_test():
    from .fashion_mnist import read_split

    return read_split(False)


def _pixels(images):
    """Fashion-MNIST's uint8 28 x 28 photos scaled to [-1, 1]: (n, 1, 28, 28) float32."""
    return torch.as_tensor(images).float()[:, None] / 127.5 - 1.0


def _flipped_shifted(x_raw, idx, x_ready, rng):
    """A fashion-mnist training batch: each image mirrored left-right with probability 1/2 and shifted by up
    to one pixel each way (background fill)."""
    x = x_ready[idx]
    flip = torch.as_tensor(rng.random(len(x)) < 0.5)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = rng.integers(0, 3, len(x)), rng.integers(0, 3, len(x))
    return torch.stack([padded[i, :, dy[i]:dy[i] + 28, dx[i]:dx[i] + 28] for i in range(len(x))])


@dataclass(frozen=True)
class Testbed:
    """One embedded testbed: its model, data, shipped seeds and training recipe (``stm_fast.train_tiny``)."""

    name: str
    config: dict
    file_stem: str  # shipped checkpoints: data/<file_stem>_seed<S>.pth
    prepare: Callable  # raw images (n, h, w) -> the model's images (n, 1, s, s) in [-1, 1]
    augment: Callable  # (raw images, batch indices, prepared images, rng) -> a training batch
    recipe: dict = field(default_factory=dict)  # train_tiny's defaults for this testbed
    read_train: Callable = _digits_train  # (data_dir or None) -> (raw training images, int64 labels)
    read_test: Callable = _digits_test  # () -> (raw test images, int64 labels)
    seeds: tuple = SEEDS  # the shipped models' seeds
    # the eval's grid when neither --methods nor --rates is given: (method groups, rates, schedule) blocks,
    # groups None = the default groups (stm_fast.eval.grid); empty = every default group at every default rate
    eval_grid: tuple = ()

    def checkpoint_path(self, seed: int) -> str:
        return os.path.join(DATA_DIR, f"{self.file_stem}_seed{seed}.pth")

    def model_name(self, seed: int) -> str:
        """How the eval names a shipped model: digits-seed0, paper-geometry-seed1 ..."""
        return f"{self.name}-seed{seed}"

    @property
    def model_config(self):
        """Its models' VimConfig: Vim-Ti's with this testbed's changes, as ``create_model`` builds them."""
        return MODEL_CONFIGS["vim_tiny"].with_overrides(**self.config)

    def create_model(self, checkpoint=None, dtype=None):
        from .models import create_model

        return create_model("vim_tiny", checkpoint_path=checkpoint, dtype=dtype, **self.config)


TESTBEDS = {
    "digits": Testbed("digits", DIGITS_CONFIG, "vim_digits", _scaled, _shifted,
                      dict(epochs=30, lr=3e-3, batch=32, warmup=0, threads=1, backend="torch")),
    "paper-geometry": Testbed("paper-geometry", PAPER_GEOMETRY_CONFIG, "vim_paper_geometry", _framed, _jittered,
                              dict(epochs=40, lr=2e-3, batch=32, warmup=2, threads=2, backend="fused")),
    "fashion-mnist": Testbed("fashion-mnist", FASHION_MNIST_CONFIG, "vim_fashion_mnist", _pixels, _flipped_shifted,
                             dict(epochs=5, lr=2e-3, batch=32, warmup=0.25, threads=1, backend="fused"),
                             read_train=_fashion_train, read_test=_fashion_test, seeds=FASHION_SEEDS,
                             eval_grid=FASHION_EVAL_GRID),
}


def testbed(name: str) -> Testbed:
    if name not in TESTBEDS:
        raise ValueError(f"unknown testbed {name!r}; choose one of {', '.join(TESTBEDS)}")
    return TESTBEDS[name]


def checkpoint_path(seed, testbed_name: str = "digits"):
    return testbed(testbed_name).checkpoint_path(seed)


def shipped_checkpoints(testbed_name: str = "digits"):
    """Paths of a testbed's shipped models, one per seed; a clear error if the package data is missing."""
    bed = testbed(testbed_name)
    paths = [bed.checkpoint_path(s) for s in bed.seeds]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"the embedded {testbed_name} models are missing ({', '.join(missing)}): reinstall the package, or recreate "
            f"them with `python -m stm_fast.train_tiny --testbed {testbed_name} --seed S` for S in {bed.seeds}")
    return paths


def create_digits_model(checkpoint=None, dtype=None, testbed_name: str = "digits"):
    return testbed(testbed_name).create_model(checkpoint, dtype)
