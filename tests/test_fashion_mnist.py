"""The fashion-mnist testbed: its data as a user has it (the shipped test split, Debian's folder, torchvision's
layout, one line when the files are missing), Vim-Ti's 197 tokens, and training that resumes per epoch."""

import gzip
import os
import shutil

import numpy as np
import pytest
import torch

from stm_fast import digits, fashion_mnist as fm, train_tiny
from stm_fast.ops.build import cache_root
from stm_fast.train_tiny import evaluate, main as train_main, train

from tests.builders import shipped_half_checkpoint


def _idx(path, array, gz):
    """Write ``array`` (uint8) as an IDX file (the MNIST format) at path[.gz]."""
    dims = array.shape
    header = bytes([0, 0, 8, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open(path + ".gz", "wb") if gz else open(path, "wb")) as f:
        f.write(data)


def _fake_split(folder, n, train, gz, seed=0):
    """n random 28 x 28 images and labels in ``folder``, named as the standard files."""
    rng = np.random.default_rng(seed)
    stem = "train" if train else "t10k"
    os.makedirs(folder, exist_ok=True)
    x, y = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
    _idx(os.path.join(folder, f"{stem}-images-idx3-ubyte"), x, gz)
    _idx(os.path.join(folder, f"{stem}-labels-idx1-ubyte"), y, gz)
    return x, y


def test_the_shipped_test_split_is_fashion_mnists_10000_images():
    x, y = fm.read_split(False)
    assert x.shape == (10000, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(torch.bincount(y), torch.full((10,), 1000)), "1000 images per class"
    assert os.path.exists(os.path.join(fm.SHIPPED_DIR, "LICENSE"))
    xt, yt = digits.load_test_split("fashion-mnist")
    assert xt.shape == (10000, 1, 28, 28) and float(xt.min()) == -1.0 and float(xt.max()) == 1.0
    assert torch.equal(yt, y)


@pytest.mark.parametrize("layout", ["debian", "torchvision_raw", "torchvision_root", "unpacked"])
def test_training_files_are_read_from_every_usual_layout(tmp_path, layout, monkeypatch):
    """Debian's folder (gzipped files side by side), torchvision's FashionMNIST/raw (under its root or given
    directly), or plain unpacked files: the same images and labels."""
    monkeypatch.setenv("STM_CACHE_DIR", str(tmp_path / "cache"))
    folder = {"debian": tmp_path / "d", "torchvision_raw": tmp_path / "r" / "FashionMNIST" / "raw",
              "torchvision_root": tmp_path / "t" / "FashionMNIST" / "raw", "unpacked": tmp_path / "u"}[layout]
    x, y = _fake_split(str(folder), 7, True, gz=layout in ("debian", "torchvision_root"))
    given = {"torchvision_root": tmp_path / "t", "torchvision_raw": folder}.get(layout, folder)
    got_x, got_y = fm.read_split(True, str(given))
    assert np.array_equal(got_x.numpy(), x) and np.array_equal(got_y.numpy(), y)


def test_missing_training_files_are_one_line_naming_the_debian_package(tmp_path, capsys):
    with pytest.raises(fm.FashionMNISTError, match="apt-get install dataset-fashion-mnist"):
        fm.read_split(True, str(tmp_path))
    with pytest.raises(SystemExit) as e:
        train_main(["--testbed", "fashion-mnist", "--seed", "0", "--data-dir", str(tmp_path / "none"),
                    "--out", str(tmp_path / "m.pth")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "apt-get install dataset-fashion-mnist" in err


@pytest.mark.slow
@pytest.mark.parametrize("seed", digits.FASHION_SEEDS)
def test_shipped_models_reach_88_percent_on_the_10000_test_images_with_float16_weights(seed):
    """Each shipped fashion-mnist model loads with weights_only=True, holds float16 weights (under 1 MB),
    records the command that trained it, and scores >= 88% on the 10,000 shipped test images, as recorded."""
    bed = digits.testbed("fashion-mnist")
    ckpt = shipped_half_checkpoint(bed, seed)
    x, y = digits.load_test_split("fashion-mnist")
    acc = evaluate(bed.create_model(bed.checkpoint_path(seed)), x, y, batch=500)
    assert len(y) == 10_000 and acc >= 0.88, f"seed {seed}: {100 * acc:.2f}%"
    assert acc == pytest.approx(ckpt["meta"]["test_accuracy"], abs=1e-4), "the recorded accuracy is reproduced"


def test_the_model_has_vim_tis_197_tokens_with_the_class_token_in_the_middle():
    model = digits.testbed("fashion-mnist").create_model()
    assert model.cfg.num_tokens == 197 and model.cfg.cls_position == 98 and model.cfg.depth >= 12


@pytest.mark.slow
def test_training_resumes_after_an_epoch_to_the_same_weights(tmp_path, monkeypatch):
    """Two epochs uninterrupted, and one epoch then --resume: identical weights (64 fake training images)."""
    monkeypatch.setenv("STM_FUSED_BUILD_DIR", str(cache_root()))  # the compiled kernels where they are; the fake
    monkeypatch.setenv("STM_CACHE_DIR", str(tmp_path / "cache"))  # data's decompressed copies apart
    data = tmp_path / "data"
    _fake_split(str(data), 64, True, gz=True)
    tiny = dict(epochs=2, batch=32, progress=False, testbed_name="fashion-mnist", data_dir=str(data))
    # four test images, where the trainer reads them (it imports the function: patching digits alone left the
    # real 10,000 evaluated after every epoch, 4 minutes)
    monkeypatch.setattr(train_tiny, "load_test_split", lambda name: (torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)))
    _, _, full = train(0, out=str(tmp_path / "full.pth"), **tiny)
    train(0, out=str(tmp_path / "part.pth"), max_steps=3, **tiny)  # stops inside epoch 2: epoch 1's state is saved
    assert os.path.exists(tmp_path / "part.pth.resume")
    _, meta, part = train(0, out=str(tmp_path / "part.pth"), resume=True, **tiny)
    a, b = torch.load(full)["model"], torch.load(part)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a) and not os.path.exists(tmp_path / "part.pth.resume")
    assert [h["epoch"] for h in meta["history"]] == [1, 2]
    shutil.copy(tmp_path / "part.pth", tmp_path / "other.pth")
    train(1, out=str(tmp_path / "other.pth"), max_steps=3, **tiny)
    with pytest.raises(ValueError, match="continues seed 1, not 0"):
        train(0, out=str(tmp_path / "other.pth"), resume=True, **tiny)
