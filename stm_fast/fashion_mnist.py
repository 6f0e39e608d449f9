"""Fashion-MNIST as a user has it: the standard IDX files, read by torchvision's MNIST-format readers.

Fashion-MNIST (Zalando Research, MIT licence; docs/testbeds.md): 28 x 28 grayscale product photos in 10
classes, 60,000 training and 10,000 test images. The test files ship inside this package
(``stm_fast/data/fashion-mnist/``, gzip as published, with the licence), so the embedded eval needs nothing
but the install; training reads the training files from a folder the user names (``--data-dir``). Nothing
here downloads.

Accepted folders: Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``, the .gz files
side by side), torchvision's layout (``ROOT/FashionMNIST/raw/``, the files uncompressed or gzipped), or a
``raw/`` folder itself. torchvision's ``FashionMNIST`` class insists on all four files (a test-only folder,
as shipped, fails its check) and reads only unpacked ones, so its readers (``read_image_file``,
``read_label_file``) are called on the files directly, gzipped ones unpacked once into a cache folder.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil

import torch

__all__ = ["DEBIAN_DIR", "SHIPPED_DIR", "CLASSES", "FashionMNISTError", "read_split", "find_files"]

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
SHIPPED_DIR = os.path.join(os.path.dirname(__file__), "data", "fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_STEMS = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_INSTALL = ("install Debian's package (apt-get install dataset-fashion-mnist, then --data-dir "
            f"{DEBIAN_DIR}) or pass --data-dir with the four standard IDX files (torchvision's FashionMNIST/raw "
            "layout works too)")


class FashionMNISTError(ValueError):
    """The Fashion-MNIST files asked for are not where they were looked for (the message says how to get them)."""


def _candidates(folder: str):
    """The folders that may hold the files: the folder, its ``raw/`` and torchvision's ``FashionMNIST/raw/``."""
    return [folder, os.path.join(folder, "raw"), os.path.join(folder, "FashionMNIST", "raw")]


def find_files(folder: str, train: bool) -> list[str]:
    """The (images, labels) files of a split in ``folder``: each unpacked or ``.gz``; FashionMNISTError if absent."""
    for cand in _candidates(folder):
        found = []
        for stem in _STEMS[train]:
            path = next((p for p in (os.path.join(cand, stem), os.path.join(cand, stem + ".gz")) if os.path.isfile(p)), None)
            found.append(path)
        if all(found):
            return found
    split = "training" if train else "test"
    raise FashionMNISTError(f"no Fashion-MNIST {split} files ({', '.join(_STEMS[train])}[.gz]) in {folder}: {_INSTALL}")


def _cache_dir() -> str:
    return os.environ.get("STM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "stm_fast")


def _unpacked(path: str) -> str:
    """``path`` itself if it is not gzipped, else an unpacked copy in the cache folder, keyed by content."""
    if not path.endswith(".gz"):
        return path
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()[:16]
    target = os.path.join(_cache_dir(), "fashion-mnist", f"{os.path.basename(path)[:-3]}-{digest}")
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.{os.getpid()}.tmp"  # another process may unpack the same file at the same time
        with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, target)
    return target


def read_split(train: bool, folder: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (n, 28, 28), labels int64 (n,)) of a Fashion-MNIST split, read by torchvision's IDX
    readers. ``folder``: where the files are (default: the shipped test files for
    ``train=False``; the training files must be named)."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    if folder is None:
        if train:
            raise FashionMNISTError(f"training needs the Fashion-MNIST training files: {_INSTALL}")
        folder = SHIPPED_DIR
    if not os.path.isdir(folder):
        raise FashionMNISTError(f"--data-dir {folder} is not a folder: {_INSTALL}")
    images, labels = find_files(folder, train)
    x, y = read_image_file(_unpacked(images)), read_label_file(_unpacked(labels)).long()
    if x.shape[1:] != (28, 28) or len(x) != len(y):
        raise FashionMNISTError(f"{images}: {tuple(x.shape)} images for {len(y)} labels, not Fashion-MNIST's 28 x 28 "
                                f"images with one label each: {_INSTALL}")
    return x, y
