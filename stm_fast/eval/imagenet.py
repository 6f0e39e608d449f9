"""ImageNet validation images for ``stm_fast.eval``: folder layouts, labels, the official transform, bad images.

Class indices always follow the canonical ImageNet-1k order (the 1000 WordNet IDs sorted, shipped in
``data/imagenet_synsets.txt``), so a folder holding only some classes is still labelled correctly.

Layouts:

* ImageFolder: ``root/<wnid>/<image>``, one sub-folder per synset (the usual ``val`` after the
  standard re-arrangement script).
* Flat: ``root/<image>`` plus ``--labels``:
  - a CSV with a header naming an image column (``filename``, ``file``, ``image``, ``ImageId`` or ``path``)
    and a label column (``label``, ``class``, ``synset``, ``wnid`` or ``PredictionString``, whose first
    token is used, as in Kaggle's ``LOC_val_solution.csv``); a label is a wnid or a 0-based canonical index;
  - or the official ``ILSVRC2012_validation_ground_truth.txt`` (one ILSVRC2012_ID per line for
    ILSVRC2012_val_00000001.JPEG, ...), together with ``--devkit`` (the devkit folder or its
    ``data/meta.mat``), which maps those IDs to wnids.
"""

from __future__ import annotations

import csv
import os
import re

import torch

__all__ = ["SYNSETS", "eval_transform", "ImageNetVal", "collate_skip_bad", "DataError", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_WNID = re.compile(r"^n\d{8}$")


class DataError(ValueError):
    """A dataset problem found before any work starts; the message names the problem and the fix."""


def _load_synsets():
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "imagenet_synsets.txt")
    with open(path) as f:
        ids = f.read().split()
    assert len(ids) == 1000 and ids == sorted(ids), "corrupt package data: imagenet_synsets.txt"
    return ids


SYNSETS = _load_synsets()
SYNSET_INDEX = {w: i for i, w in enumerate(SYNSETS)}


def eval_transform(img_size=224, crop_pct=0.875):
    """docs/conventions.md §9: Resize(int(224 / 0.875), bicubic), CenterCrop(224), ToTensor, ImageNet mean/std."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(int(img_size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])


def _is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _label_of(value, where):
    value = str(value).strip()
    if _WNID.match(value):
        if value not in SYNSET_INDEX:
            raise DataError(f"{where}: {value!r} is not one of the 1000 ImageNet-1k synsets")
        return SYNSET_INDEX[value]
    if value.isdigit() and int(value) < 1000:
        return int(value)
    raise DataError(f"{where}: label {value!r} is neither a synset id (nXXXXXXXX) nor a class index 0..999")


def _devkit_mapping(devkit):
    """ILSVRC2012_ID (1..1000) -> wnid, from the devkit's meta.mat."""
    from scipy.io import loadmat

    path = devkit
    if os.path.isdir(devkit):
        path = os.path.join(devkit, "data", "meta.mat")
    if not os.path.isfile(path):
        raise DataError(f"--devkit {devkit}: no meta.mat found (expected the ILSVRC2012 devkit folder or data/meta.mat)")
    meta = loadmat(path, squeeze_me=True)["synsets"]
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in meta if int(s["ILSVRC2012_ID"]) <= 1000}


def _read_labels(path, files, devkit=None):
    """{filename: class index} for the flat layout."""
    if not os.path.isfile(path):
        raise DataError(f"--labels {path}: file not found")
    with open(path, newline="") as f:
        text = f.read()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"--labels {path}: the file is empty")
    if all(ln.strip().isdigit() for ln in lines[:50]):  # official ground truth: one ILSVRC2012_ID per line
        if devkit is None:
            raise DataError(
                f"--labels {path} looks like the official ILSVRC2012_validation_ground_truth.txt (ILSVRC2012 IDs, not "
                f"class indices): also pass --devkit <ILSVRC2012_devkit_t12 folder> so the IDs can be mapped to synsets")
        ids = _devkit_mapping(devkit)
        names = sorted(files)
        if len(lines) != len(names) and len(lines) < len(names):
            raise DataError(f"--labels {path} has {len(lines)} lines but the folder has {len(names)} images")
        by_name = {f"ILSVRC2012_val_{i + 1:08d}": SYNSET_INDEX[ids[int(v)]] for i, v in enumerate(lines)}
        return {n: by_name.get(os.path.splitext(n)[0]) for n in names}
    reader = csv.DictReader(lines)
    fields = {k.lower(): k for k in (reader.fieldnames or [])}
    img_col = next((fields[k] for k in ("filename", "file", "image", "imageid", "path") if k in fields), None)
    lab_col = next((fields[k] for k in ("label", "class", "synset", "wnid", "predictionstring") if k in fields), None)
    if img_col is None or lab_col is None:
        raise DataError(f"--labels {path}: expected a CSV header with an image column (filename/file/image/ImageId/path) "
                        f"and a label column (label/class/synset/wnid/PredictionString); found {reader.fieldnames}")
    out = {}
    for row_no, row in enumerate(reader, start=2):
        name = os.path.basename(row[img_col].strip())
        value = row[lab_col].split()[0] if row[lab_col].strip() else ""
        out[os.path.splitext(name)[0]] = _label_of(value, f"--labels {path}, line {row_no}")
    return {n: out.get(os.path.splitext(n)[0]) for n in files}


class ImageNetVal(torch.utils.data.Dataset):
    """Images and canonical labels from an ImageFolder or a flat folder (+ labels); unreadable images yield None."""

    def __init__(self, root, labels=None, devkit=None, transform=None, limit=None):
        if not os.path.isdir(root):
            raise DataError(f"--data {root}: no such folder")
        entries = sorted(os.listdir(root))
        subdirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
        images = [e for e in entries if _is_image(e) and os.path.isfile(os.path.join(root, e))]
        samples = []
        if subdirs and labels is None:
            bad = [d for d in subdirs if d not in SYNSET_INDEX]
            if bad:
                raise DataError(f"--data {root}: sub-folders must be ImageNet synset ids (e.g. n01440764); these are not: "
                                f"{bad[:5]}. For a flat folder of images pass --labels")
            for d in subdirs:
                for dirpath, _, names in sorted(os.walk(os.path.join(root, d))):
                    samples += [(os.path.join(dirpath, n), SYNSET_INDEX[d]) for n in sorted(names) if _is_image(n)]
        elif images:
            if labels is None:
                raise DataError(f"--data {root} is a flat folder of {len(images)} images: pass --labels (a CSV, or the "
                                f"official ground-truth file with --devkit) so they can be scored")
            mapping = _read_labels(labels, images, devkit)
            missing = [n for n in images if mapping.get(n) is None]
            if missing:
                raise DataError(f"--labels {labels} does not match the images: {len(missing)} of {len(images)} have no "
                                f"label (e.g. {missing[:3]}); is it the label file of this folder?")
            samples = [(os.path.join(root, n), mapping[n]) for n in images]
        if not samples:
            raise DataError(f"--data {root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
        if limit is not None:
            samples = samples[:limit]
        self.samples = samples
        self.transform = transform or eval_transform()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")  # grayscale, CMYK, palette, PNG-in-.JPEG: all end up RGB
                x = self.transform(im)
        except Exception as e:  # noqa: BLE001 - any decoding failure is a bad image, reported not raised
            return None, label, i, f"{path}: {type(e).__name__}: {str(e)[:120]}"
        return x, label, i, None


def collate_skip_bad(batch):
    """Stack the good images; return (images or None, labels, indices, [bad messages])."""
    good = [b for b in batch if b[0] is not None]
    bad = [b[3] for b in batch if b[0] is None]
    if not good:
        return None, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), bad
    return (torch.stack([b[0] for b in good]), torch.as_tensor([b[1] for b in good]),
            torch.as_tensor([b[2] for b in good]), bad)
