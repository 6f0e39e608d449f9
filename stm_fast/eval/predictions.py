"""Per-image top-1 predictions of every configuration, kept beside the counts so that comparisons are paired.

Each rank keeps, in ``--out/predictions/``, one int16 array per experiment (the top-1 class of every image
of its shard, -1 until computed or when the image could not be read), one for the labels, and per
experiment two float32 arrays of the finer measures against the baseline on the same image (NaN until
computed): the KL divergence of the prediction from the baseline's, and the class token's relative
deviation from the baseline's after the last layer; all memory-mapped ``.npy`` files written in place after
every batch (before the progress file records the batch, so
a batch counted as done always has its predictions on disk). At the end the ranks' arrays are gathered in
rank order, which is the same for every experiment: position p of every array is the same image.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

__all__ = ["PredictionStore", "correct"]


def correct(preds, labels, names, e):
    """(models, valid images) bool: whether each model's top-1 under experiment ``e`` is the label, on the
    images that were read (label >= 0), one row per model of ``names``; and the valid mask."""
    valid = labels >= 0
    return np.stack([preds[e.key(m)][valid] == labels[valid] for m in names]), valid


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

    def _array(self, name, dtype=np.int16):
        path = os.path.join(self.folder, f"{name}.rank{self.rank}.npy")
        if os.path.exists(path):
            a = np.load(path, mmap_mode="r+")
            if a.shape == (self.n,) and a.dtype == dtype:
                return a
        a = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(self.n,))
        a[:] = -1 if dtype == np.int16 else np.nan
        return a

    def _arrays(self, key):
        if key not in self.arrays:
            self.arrays[key] = (self._array(_name(key)), self._array(_name(key) + ".kl", np.float32),
                                self._array(_name(key) + ".dev", np.float32))
        return self.arrays[key]

    def record(self, key, positions, top1, kl=None, deviation=None):
        """Store, for the images at these shard positions, experiment ``key``'s top-1 classes and, when given,
        its KL divergence from the baseline and the class token's final deviation from it."""
        pred, kl_a, dev_a = self._arrays(key)
        pred[positions] = top1
        if kl is not None:
            kl_a[positions] = kl
            dev_a[positions] = deviation

    def record_labels(self, positions, labels):
        self.labels[positions] = labels

    def flush(self):
        self.labels.flush()
        for arrays in self.arrays.values():
            for a in arrays:
                a.flush()

    def gather(self, keys, world):
        """(labels, {key: predictions}, {key: (kl, deviation)}) over all ranks, aligned by image."""
        mine = {k: tuple(np.asarray(a) for a in self._arrays(k)) for k in keys}
        local = (np.asarray(self.labels), mine)
        parts = [local]
        if world > 1:
            parts = [None] * world
            torch.distributed.all_gather_object(parts, local)
        labels = np.concatenate([p[0] for p in parts]).astype(np.int64)
        joined = {k: [np.concatenate([p[1][k][i] for p in parts]) for i in range(3)] for k in keys}
        return (labels, {k: v[0].astype(np.int64) for k, v in joined.items()},
                {k: (v[1].astype(np.float64), v[2].astype(np.float64)) for k, v in joined.items()})
