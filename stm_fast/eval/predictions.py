"""Per-image top-1 predictions of every configuration, kept beside the counts so that comparisons are paired.

Each rank keeps, in ``--out/predictions/``, one int16 array per experiment (the top-1 class of every image
of its shard, -1 until computed or when the image could not be read), one for the labels, one int64 array of
the images' content digests (``imagenet.content_digest`` of each file's bytes, 0 until read; all 0 for an
embedded testbed, whose content is in the run's fingerprint), and per experiment two float32 arrays of the
finer measures against the baseline on the same image (NaN until computed): the KL divergence of the
prediction from the baseline's, and the class token's relative deviation from the baseline's after the last
layer; all memory-mapped ``.npy`` files written in place after every batch (before the progress file
records the batch, so a batch counted as done always has its predictions on disk). At the end the ranks'
arrays are gathered in rank order, which is the same for every experiment: position p of every array is the
same image.

A new array is written whole (no sparse blocks: writing into its memory map never needs disk space) under a
temporary name and renamed into place, so a full disk leaves no partial file. A missing or damaged array is
made anew; ``unbacked`` tells the progress which counted configurations lost their predictions (they are
recomputed), and ``check_images`` refuses an image whose content changed since its predictions were made.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from .errors import RunError

__all__ = ["PredictionStore", "correct", "unbacked", "stored_bytes", "filled"]

_EMPTY = {np.dtype(np.int16): -1, np.dtype(np.float32): np.nan, np.dtype(np.int64): 0}  # "not yet computed"
_SUFFIXES = (("", np.int16), (".kl", np.float32), (".dev", np.float32))  # the arrays of one experiment
_HEADER = 128  # bytes of a .npy header


def correct(preds, labels, names, e):
    """(models, valid images) bool: whether each model's top-1 under experiment ``e`` is the label, on the
    images that were read (label >= 0), one row per model of ``names``; and the valid mask."""
    valid = labels >= 0
    return np.stack([preds[e.key(m)][valid] == labels[valid] for m in names]), valid


def _name(key):
    return hashlib.sha1(key.encode()).hexdigest()[:20]


def filled(a) -> int:
    """How many entries of a prediction, label or measure array (of any int or float dtype) are computed: not -1,
    not NaN."""
    a = np.asarray(a)
    return int((~np.isnan(a)).sum()) if a.dtype.kind == "f" else int((a != -1).sum())


def stored_bytes(images, experiments, world=1) -> int:
    """Bytes the prediction files of ``experiments`` (model x configuration) over ``images`` take, all ranks."""
    per_image = sum(np.dtype(d).itemsize for _, d in _SUFFIXES)
    return experiments * (per_image * images + len(_SUFFIXES) * _HEADER * world) + 10 * images + 2 * _HEADER * world


def _open(path, dtype, n=None, mode="r+"):
    """The memory map of an existing ``.npy`` of ``dtype`` (and ``n`` entries when given); None when the file is
    missing, cut short, not a .npy, or of another dtype or shape."""
    try:
        a = np.load(path, mmap_mode=mode)
    except (OSError, ValueError, EOFError):  # missing, empty or cut-short files, foreign bytes
        return None
    ok = a.dtype == np.dtype(dtype) and a.ndim == 1 and (n is None or a.shape == (n,))
    return a if ok else None


def _create(path, dtype, n):
    """A new ``.npy`` of n 'not yet computed' entries: written whole under a temporary name, synced, renamed.
    An OSError names ``path``; nothing is left behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.lib.format.write_array(f, np.full(n, _EMPTY[np.dtype(dtype)], dtype), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(e.errno, e.strerror, path) from None


def unbacked(folder, tag, counted) -> list:
    """The keys of ``counted`` ({key: images counted as done}) whose prediction arrays ``<name>.<tag>.npy`` in
    ``folder`` are missing, damaged, of another length than the labels or hold fewer computed entries than
    counted; every key when the labels or the content digests are missing or damaged."""
    if not counted:
        return []
    labels = _open(os.path.join(folder, f"labels.{tag}.npy"), np.int16, mode="r")
    digests = _open(os.path.join(folder, f"digests.{tag}.npy"), np.int64, mode="r")
    if labels is None or digests is None or digests.shape != labels.shape or filled(labels) < max(counted.values()):
        return list(counted)
    lost = []
    for key, images in counted.items():
        arrays = [_open(os.path.join(folder, f"{_name(key)}{suffix}.{tag}.npy"), dtype, len(labels), "r")
                  for suffix, dtype in _SUFFIXES]
        if any(a is None or filled(a) < images for a in arrays):
            lost.append(key)
    return lost


class PredictionStore:
    """The predictions of one rank's shard of ``n`` images."""

    def __init__(self, out, rank, n):
        self.folder = os.path.join(out, "predictions")
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.folder) from None
        self.rank, self.n = rank, n
        self.arrays = {}
        self.labels = self._array("labels")
        self.digests = self._array("digests", np.int64)

    def _array(self, name, dtype=np.int16):
        """The array ``name`` of this rank, opened, or made anew when missing or damaged (the progress has
        dropped the counts a damaged file held: ``unbacked``)."""
        path = os.path.join(self.folder, f"{name}.rank{self.rank}.npy")
        a = _open(path, dtype, self.n)
        if a is None:
            _create(path, dtype, self.n)
            a = _open(path, dtype, self.n)
        return a

    def _arrays(self, key):
        if key not in self.arrays:
            self.arrays[key] = tuple(self._array(_name(key) + suffix, dtype) for suffix, dtype in _SUFFIXES)
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

    def check_images(self, items, world):
        """``items``: [(dataset index, path, content digest)] of a batch (``collate_skip_bad``). Each digest is
        recorded, or, where one is recorded, compared: an image whose content changed since its predictions
        were made is a RunError (one line naming it), never mixed into the old numbers."""
        if not items:
            return
        positions = (np.array([i for i, _, _ in items], dtype=np.int64) - self.rank) // world
        new = np.array([d for _, _, d in items], dtype=np.int64)
        old = np.asarray(self.digests[positions])
        changed = np.flatnonzero((old != 0) & (old != new))
        if changed.size:
            raise RunError(f"{items[changed[0]][1]} changed since its predictions in {self.folder} were made (same "
                           f"name, size and label, other content; {changed.size} image(s) of this batch): its old "
                           f"and new numbers cannot be mixed; pass --restart to discard the old ones, or choose "
                           f"another --out")
        self.digests[positions] = new

    def flush(self):
        """Every array's changes to disk (an OSError names the folder)."""
        try:
            for a in (self.labels, self.digests, *(a for arrays in self.arrays.values() for a in arrays)):
                a.flush()
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.folder) from None

    def gather(self, keys, world):
        """(labels, {key: predictions}, {key: (kl, deviation)}) over all ranks, aligned by image."""
        mine = {k: tuple(np.asarray(a) for a in self._arrays(k)) for k in keys}
        local = (np.asarray(self.labels), mine)
        parts = [local]
        if world > 1:
            parts = [None] * world
            torch.distributed.all_gather_object(parts, local)
        # rank r holds images r, r + world, ...: put every array back in image order, so that the statistics
        # (a seeded bootstrap among them) do not depend on the number of processes
        n = sum(len(p[0]) for p in parts)
        order = np.argsort(np.concatenate([np.arange(r, n, len(parts)) for r in range(len(parts))]), kind="stable")
        labels = np.concatenate([p[0] for p in parts]).astype(np.int64)[order]
        joined = {k: [np.concatenate([p[1][k][i] for p in parts])[order] for i in range(3)] for k in keys}
        return (labels, {k: v[0].astype(np.int64) for k, v in joined.items()},
                {k: (v[1].astype(np.float64), v[2].astype(np.float64)) for k, v in joined.items()})
