"""ImageNet validation images for ``stm_fast.eval``: folder layouts, the official transform, image decoding.

Layouts:

* ImageFolder: ``root/<wnid>/<image>``, one sub-folder per synset (the usual ``val`` after the standard
  re-arrangement script); the folders hold the labels, so ``--labels`` is refused there.
* Flat: ``root/<image>`` plus ``--labels`` (``stm_fast.eval.labels`` lists the accepted files).

Only regular files are read: a FIFO, a device or a broken link with an image name is skipped and
listed (``skipped``), never opened. An image that cannot be decoded is excluded and reported per batch.
Each file's bytes are read once, hashed (``content_digest``) and decoded from memory: the digest travels
with the image, so a resumed run can tell an image whose content changed under the same name and size.
Images are converted to 8-bit RGB (``to_rgb``): 16-bit and 32-bit integer greyscale (modes I;16, I) is
scaled by 1/257 (65535 -> 255), floating-point greyscale (mode F) in [0, 1] by 255 and in [0, 255] kept;
other values are reported as unreadable rather than clipped into a different picture.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat

import numpy as np
import torch

from .labels import SYNSET_INDEX, SYNSETS, DataError, read_labels

__all__ = ["SYNSETS", "eval_transform", "ImageNetVal", "collate_skip_bad", "DataError", "IMAGE_EXTENSIONS", "to_rgb",
           "content_digest"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def eval_transform(img_size=224, crop_pct=0.875):
    """docs/conventions.md §9: Resize(int(224 / 0.875), bicubic), CenterCrop(224), ToTensor, ImageNet mean/std."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(int(img_size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])


def content_digest(data: bytes) -> int:
    """A non-zero int64 digest of a file's bytes (BLAKE2b, 8 bytes); 0 means 'not recorded' where it is stored."""
    value = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)
    return value or 1


def ignored_note(dataset) -> str | None:
    """The note a run prints about the files of ``--data`` it does not read (None when it reads them all)."""
    ignored = getattr(dataset, "ignored", [])
    if not ignored:
        return None
    return (f"note: {len(ignored)} file(s) in --data are not read (e.g. {', '.join(ignored[:3])}): only "
            f"{' '.join(IMAGE_EXTENSIONS)} files are images, and an ImageFolder's images sit in its class folders; "
            f"the run's summary counts them (ignored_files in results.json)")


def _is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _regular_images(folder, names, skipped, ignored=None):
    """The image-named regular files among ``names`` of ``folder``; the others are added to ``skipped``, and
    regular files without an image extension (a .gif, a README) to ``ignored``."""
    out = []
    for n in sorted(names):
        if not _is_image(n):
            if ignored is not None and os.path.isfile(os.path.join(folder, n)):
                ignored.append(os.path.join(folder, n))
            continue
        path = os.path.join(folder, n)
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            skipped.append(f"{path}: {type(e).__name__} ({e.strerror or e})")
            continue
        if stat.S_ISREG(mode):
            out.append(n)
        elif not stat.S_ISDIR(mode):
            skipped.append(f"{path}: not a regular file (a FIFO, socket or device); not opened")
    return out


def to_rgb(im):
    """An 8-bit RGB copy of a PIL image, scaling 16-bit, 32-bit integer and float greyscale instead of clipping
    it (see the module docstring). ValueError for values that no such scaling maps to 0..255."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if not np.isfinite(a).all() or lo < 0:
            raise ValueError(f"{im.mode} image with negative or non-finite values")
        if im.mode == "F":
            scale = 255.0 if hi <= 1 else 1.0 if hi <= 255 else None
        else:
            scale = 1 / 257 if hi <= 65535 else None
        if scale is None:
            raise ValueError(f"{im.mode} image with values up to {hi:g}: no known scale maps them to 0..255")
        return Image.fromarray(np.round(a * scale).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")  # grayscale, CMYK, palette, PNG-in-.JPEG: all end up RGB


def _imagefolder(root, subdirs, skipped, ignored):
    bad = [d for d in subdirs if d not in SYNSET_INDEX]
    if bad:
        raise DataError(f"--data {root}: sub-folders must be ImageNet synset ids (nXXXXXXXX, e.g. n01440764), one per "
                        f"class; found {len(bad)} that are not: {bad[:5]}. For a flat folder of images pass --labels")
    samples = []
    for d in subdirs:
        for dirpath, _, names in sorted(os.walk(os.path.join(root, d))):
            samples += [(os.path.join(dirpath, n), SYNSET_INDEX[d])
                        for n in _regular_images(dirpath, names, skipped, ignored)]
    return samples


def _flat(root, images, labels, devkit):
    if labels is None:
        raise DataError(f"--data {root} is a flat folder of {len(images)} images: pass --labels (a CSV, or the "
                        f"official ground-truth file with --devkit) so they can be scored")
    mapping = read_labels(labels, images, devkit)
    missing = [n for n in images if mapping.get(n) is None]
    if missing:
        raise DataError(f"--labels {labels} does not match the images: {len(missing)} of {len(images)} have no "
                        f"label (e.g. {missing[:3]}); is it the label file of this folder?")
    return [(os.path.join(root, n), mapping[n]) for n in images]


class ImageNetVal(torch.utils.data.Dataset):
    """Images and canonical labels from an ImageFolder or a flat folder (+ labels); unreadable images yield None."""

    def __init__(self, root, labels=None, devkit=None, transform=None, limit=None):
        if not os.path.isdir(root):
            raise DataError(f"--data {root}: no such folder")
        entries = sorted(os.listdir(root))
        subdirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
        self.skipped = []  # image-named entries that are not regular files: listed, never opened
        self.ignored = []  # files that are not read: no image extension, or images beside the class folders
        images = _regular_images(root, entries, self.skipped, self.ignored)
        if subdirs and labels is not None and not images:
            raise DataError(f"--data {root} is an ImageFolder (one sub-folder per synset), which already holds the "
                            f"labels: drop --labels {labels}")
        if subdirs and labels is None:  # an ImageFolder: images beside its class folders have no label
            self.ignored += [os.path.join(root, n) for n in images]
        samples = _imagefolder(root, subdirs, self.skipped, self.ignored) if subdirs and labels is None else (
            _flat(root, images, labels, devkit) if images else [])
        if not samples:
            raise DataError(f"--data {root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
        self.samples = samples[:limit] if limit is not None else samples
        self.transform = transform or eval_transform()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        """(image or None, label, i, error message or None, (path, content digest of the file's bytes))."""
        from PIL import Image

        path, label = self.samples[i]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:  # unreadable: its digest says so, so that a file readable later counts as changed
            unreadable = content_digest(b"\0unreadable " + str(e.errno).encode())
            return None, label, i, f"{path}: {type(e).__name__}: {str(e)[:120]}", (path, unreadable)
        digest = content_digest(data)
        try:
            with Image.open(io.BytesIO(data)) as im:
                x = self.transform(to_rgb(im))
        except Exception as e:  # noqa: BLE001 - any decoding failure is a bad image, reported not raised
            return None, label, i, f"{path}: {type(e).__name__}: {str(e)[:120]}", (path, digest)
        return x, label, i, None, (path, digest)


def collate_skip_bad(batch):
    """Stack the good images; return (images or None, labels, indices, [bad messages], [(index, path, content
    digest)] of every image of the batch that carries a digest, the unreadable ones included)."""
    good = [b for b in batch if b[0] is not None]
    bad = [b[3] for b in batch if b[0] is None]
    digests = [(b[2], *b[4]) for b in batch if len(b) > 4]
    if not good:
        return None, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), bad, digests
    return (torch.stack([b[0] for b in good]), torch.as_tensor([b[1] for b in good]),
            torch.as_tensor([b[2] for b in good]), bad, digests)
