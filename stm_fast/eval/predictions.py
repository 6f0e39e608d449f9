"""Per-image top-1 predictions of every configuration, kept beside the counts so that comparisons are paired.

Each rank keeps, in ``--out/predictions/``, one int16 array per experiment (the top-1 class of every image
of its shard, -1 until computed or when the image could not be read) and one for the labels, as memory-
mapped ``.npy`` files written in place after every batch (before the progress file records the batch, so
a batch counted as done always has its predictions on disk). At the end the ranks' arrays are gathered in
rank order, which is the same for every experiment: position p of every array is the same image.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

__all__ = ["PredictionStore"]


def _name(key):
    return hashlib.sha1(key.encode()).hexdigest()[:20]


class PredictionStore:
    """The predictions of one rank's shard of ``n`` images."""

    def __init__(self, out, rank, n):
        self.folder = os.path.join(out, "predictions")
        os.makedirs(self.folder, exist_ok=True)
        self.rank, self.n = rank, n
        self.arrays = {}
        self.labels = self._array("labels")

    def _array(self, name):
        path = os.path.join(self.folder, f"{name}.rank{self.rank}.npy")
        if os.path.exists(path):
            a = np.load(path, mmap_mode="r+")
            if a.shape == (self.n,) and a.dtype == np.int16:
                return a
        a = np.lib.format.open_memmap(path, mode="w+", dtype=np.int16, shape=(self.n,))
        a[:] = -1
        return a

    def record(self, key, positions, top1):
        """Store the top-1 classes of the images at these shard positions for experiment ``key``."""
        if key not in self.arrays:
            self.arrays[key] = self._array(_name(key))
        self.arrays[key][positions] = top1

    def record_labels(self, positions, labels):
        self.labels[positions] = labels

    def flush(self):
        for a in (self.labels, *self.arrays.values()):
            a.flush()

    def gather(self, keys, world):
        """(labels, {key: predictions}) over all ranks, as int arrays aligned by image."""
        mine = {k: np.asarray(self.arrays[k] if k in self.arrays else self._array(_name(k))) for k in keys}
        local = (np.asarray(self.labels), mine)
        parts = [local]
        if world > 1:
            parts = [None] * world
            torch.distributed.all_gather_object(parts, local)
        labels = np.concatenate([p[0] for p in parts]).astype(np.int64)
        return labels, {k: np.concatenate([p[1][k] for p in parts]).astype(np.int64) for k in keys}
