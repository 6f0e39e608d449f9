"""What an eval run evaluates: the models (an embedded testbed or a checkpoint) and the images."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from .. import digits
from ..checkpoint import CheckpointError
from ..models import create_model
from .errors import RunError
from .imagenet import DataError, ImageNetVal, eval_transform

__all__ = ["load_models", "load_dataset", "first_images", "data_name"]


def data_name(args) -> str:
    """The images of the run, in words."""
    if args.data is None:
        return f"the {args.testbed} testbed's test split"
    return f"the images of {os.path.abspath(args.data)}"


def load_models(args, device):
    """[(name, model)] in eval mode on ``device``: an embedded testbed's shipped seeds, or the checkpoint."""
    if args.checkpoint is None and args.data is None:
        bed = digits.testbed(args.testbed)
        return [(bed.model_name(s), bed.create_model(p).to(device))
                for s, p in zip(bed.seeds, digits.shipped_checkpoints(args.testbed), strict=True)]
    if args.checkpoint is None or args.data is None:
        raise RunError("a real run needs both --checkpoint and --data (with neither, the embedded digits default runs)")
    try:
        model = create_model(args.model, checkpoint_path=args.checkpoint, ema=args.ema, **args.overrides)
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise RunError(f"--model {args.model} with --override {' '.join(args.override)}: {e}") from None
    return [(args.model, model.to(device))]


class _TensorData(torch.utils.data.Dataset):
    """In-memory images and labels with the (image, label, index, error) items of ``ImageNetVal`` (whose files'
    content digests are checked per image; this split's content is in the run's fingerprint instead)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def content_digest(self) -> str:
        """SHA-256 of the images' and the labels' bytes (dtype and shape included)."""
        h = hashlib.sha256()
        for t in (self.x, self.y):
            a = np.ascontiguousarray(t.numpy() if torch.is_tensor(t) else np.asarray(t))
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i]), i, None


def load_dataset(args, cfg):
    """An embedded testbed's test split (shipped with the package) or the ImageNet validation folder of
    ``--data``, whose labels must be classes of the model (``cfg``)."""
    if args.data is None:
        x, y = digits.load_test_split(args.testbed)
        if args.limit:
            x, y = x[: args.limit], y[: args.limit]
        return _TensorData(x, y)
    data = ImageNetVal(args.data, labels=args.labels, devkit=args.devkit, limit=args.limit,
                       transform=eval_transform(cfg.img_size))
    outside = [(p, label) for p, label in data.samples if label >= cfg.num_classes]
    if outside:
        raise DataError(f"{len(outside)} image(s) have a label outside the model's {cfg.num_classes} classes (e.g. "
                        f"{outside[0][0]}: class {outside[0][1]}); is --override num_classes right?")
    return data


def first_images(dataset, n):
    """Up to n readable images of the dataset, stacked (None if none can be read)."""
    images = []
    for i in range(len(dataset)):
        x = dataset[i][0]
        if x is not None:
            images.append(x)
        if len(images) == n:
            break
    return torch.stack(images) if images else None
