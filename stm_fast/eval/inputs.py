"""What an eval run evaluates: the models (the embedded digits default or a checkpoint) and the images."""

from __future__ import annotations

import os

import torch

from .. import digits
from ..models import create_model
from .errors import RunError
from .imagenet import ImageNetVal, eval_transform

__all__ = ["load_models", "load_dataset", "run_settings"]


def load_models(args, device):
    """[(name, model)] in eval mode on ``device``."""
    if args.checkpoint is None and args.data is None:
        return [(f"digits-seed{s}", digits.create_digits_model(p).to(device))
                for s, p in zip(digits.SEEDS, digits.shipped_checkpoints())]
    if args.checkpoint is None or args.data is None:
        raise RunError("a real run needs both --checkpoint and --data (with neither, the embedded digits default runs)")
    model = create_model(args.model, checkpoint_path=args.checkpoint, ema=args.ema, **args.overrides).to(device)
    return [(args.model, model)]


class _TensorData(torch.utils.data.Dataset):
    """In-memory images and labels with the (image, label, index, error) items ``ImageNetVal`` yields."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i]), i, None


def load_dataset(args, img_size):
    """The digits test split (embedded default) or the ImageNet validation folder of ``--data``."""
    if args.data is None:
        _, _, x, y = digits.load_split()
        if args.limit:
            x, y = x[: args.limit], y[: args.limit]
        return _TensorData(x, y)
    return ImageNetVal(args.data, labels=args.labels, devkit=args.devkit, limit=args.limit,
                       transform=eval_transform(img_size))


def run_settings(args):
    """What determines the numbers of a run, as recorded in ``run.json``."""
    return {"model": args.model if args.checkpoint else "digits",
            "checkpoint": os.path.abspath(args.checkpoint) if args.checkpoint else None,
            "data": os.path.abspath(args.data) if args.data else "sklearn-digits-test", "labels": args.labels,
            "limit": args.limit, "batch_size": args.batch_size, "dtype": args.dtype, "ema": args.ema,
            "overrides": args.overrides}
