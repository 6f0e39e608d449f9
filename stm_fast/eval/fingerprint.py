"""What determines the numbers of an eval run, recorded in ``run.json``: a resumed run must have the same.

The fingerprint holds the checkpoint's size, modification time and SHA-256 (the shipped digits models'
SHA-256 for the embedded default), the image list (count and a SHA-256 of the sorted relative names,
sizes and labels), for an embedded testbed a SHA-256 of its test split's tensors (an image folder's content
is checked per image instead, as each file is read: ``imagenet.content_digest``, stored beside the
predictions), the label file's and the devkit's SHA-256, the model options, the batch size, the limit, the
precision, the scan backend and device type, and the code version (the package version and a SHA-256 of
its Python sources). Paths are recorded too, but only as information: moving the same files elsewhere
does not change the fingerprint.
"""

from __future__ import annotations

import hashlib
import os

import torch

from .. import digits
from ..ssm import resolve_backend

__all__ = ["run_fingerprint", "file_digest", "code_version", "describe_difference", "model_count"]

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def file_digest(path) -> str:
    """SHA-256 of a file's bytes (read in 8 MB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()


def code_version() -> str:
    """The installed package version and a SHA-256 of the sources of stm_fast and stm_ref."""
    from importlib import metadata

    try:
        version = metadata.version("stm-vim")
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        version = "source"
    h = hashlib.sha256()
    for pkg in (_PACKAGE, os.path.join(os.path.dirname(_PACKAGE), "stm_ref")):
        for dirpath, _, names in sorted(os.walk(pkg)):
            for n in sorted(names):
                if n.endswith((".py", ".cpp")):
                    h.update(n.encode())
                    h.update(open(os.path.join(dirpath, n), "rb").read())
    return f"{version}+{h.hexdigest()[:16]}"


def _images(dataset, testbed=None):
    """(count, SHA-256 of the sorted (name relative to the data folder, size, label) list) of the images
    evaluated."""
    samples = getattr(dataset, "samples", None)
    if samples is None:  # an embedded testbed's test split: its content is "image_content"
        return {"count": len(dataset), "digest": f"{testbed}-test-split"}
    root = os.path.commonpath([p for p, _ in samples]) if len(samples) > 1 else os.path.dirname(samples[0][0])
    rows = sorted(f"{os.path.relpath(p, root)}\t{os.path.getsize(p)}\t{label}" for p, label in samples)
    return {"count": len(rows), "digest": hashlib.sha256("\n".join(rows).encode()).hexdigest()}


def _checkpoint(args):
    if args.checkpoint is None:
        return {args.testbed: [file_digest(p) for p in digits.shipped_checkpoints(args.testbed)]}
    # the content decides: a touched or copied checkpoint with the same bytes is the same checkpoint
    return {"size": os.path.getsize(args.checkpoint), "sha256": file_digest(args.checkpoint)}


def run_fingerprint(args, dataset, device) -> dict:
    """The fingerprint of the run ``args`` describes (see the module docstring)."""
    devkit = args.devkit
    if devkit and os.path.isdir(devkit):
        devkit = os.path.join(devkit, "data", "meta.mat")
    return {
        "model": args.model if args.checkpoint else args.testbed, "ema": args.ema, "overrides": args.overrides,
        "checkpoint": _checkpoint(args), "images": _images(dataset, args.testbed if args.data is None else None),
        "image_content": dataset.content_digest() if hasattr(dataset, "content_digest") else None,
        "labels": file_digest(args.labels) if args.labels else None, "devkit": file_digest(devkit) if devkit else None,
        "limit": args.limit, "batch_size": args.batch_size, "dtype": args.dtype,
        "backend": resolve_backend(None, device), "device": device.type, "torch": torch.__version__,
        "code": code_version(),
    }


def model_count(fingerprint) -> int:
    """How many models the run of ``fingerprint`` evaluates (an embedded testbed: one per shipped checkpoint)."""
    checkpoint = fingerprint["checkpoint"]
    return len(checkpoint[fingerprint["model"]]) if fingerprint["model"] in checkpoint else 1


_NAMES = {"checkpoint": "the checkpoint file's content", "images": "the image list (names, sizes or labels)",
          "image_content": "the test split's image content",
          "labels": "the label file", "devkit": "the devkit", "code": "the package's code", "backend": "the scan backend",
          "torch": "the torch version"}


def describe_difference(old: dict, new: dict) -> str:
    """What changed between two fingerprints, in words: 'the checkpoint file's content, batch_size (128 -> 64)'."""
    parts = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            parts.append(_NAMES.get(key) or f"{key} ({old.get(key)!r} -> {new.get(key)!r})")
    return ", ".join(parts)
