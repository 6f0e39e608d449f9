"""Test set-up for tests/: Triton through its interpreter where there is no GPU, and the fixtures several
test modules share (their builders are in tests/builders.py)."""

import os

import pytest
import torch

from tests.builders import image_folders, small_checkpoint

if not torch.cuda.is_available():
    # Must be set before stm_fast.ops.scan_triton is first imported (triton reads it when decorating kernels).
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Every test on one torch thread: the tensors here are tiny, and on a 2-core machine thread start-up and
    oversubscription made some tests 5-15x slower (a test that needs threads sets its own count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small-config checkpoint in the official format (tests.builders.SMALL)."""
    return small_checkpoint(tmp_path_factory.mktemp("ckpt") / "vim_small_config.pth")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(ImageFolder, flat folder, labels CSV) of the same images, one corrupt file in each."""
    return image_folders(tmp_path_factory.mktemp("data"))
