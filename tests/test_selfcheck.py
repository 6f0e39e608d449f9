"""Every run checks itself first: a backend further from the float64 torch copy than its allowance stops eval
and bench before any work, with one line naming the backend, the device, the error and the way out."""

import json
import os

import pytest
import torch

from stm_fast import bench, ssm
from stm_fast.eval import cli
from stm_fast.ops import scan_loop
from stm_fast.selfcheck import TOLERANCE, SelfCheckFailed, self_check


@pytest.fixture
def broken_loop(monkeypatch):
    """The loop backend made the automatic choice, and made wrong by 1% in every output."""
    real = scan_loop.scan_loop
    monkeypatch.setenv("STM_SCAN_BACKEND", "loop")
    monkeypatch.setattr(scan_loop, "scan_loop", lambda *a, **k: (lambda y, h: (y * 1.01, h))(*real(*a, **k)))


def test_a_broken_backend_stops_the_eval_before_any_work(tmp_path, capsys, broken_loop):
    out = tmp_path / "o"
    assert cli.main(["--limit", "20", "--methods", "stm", "--rates", "0.2", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: self-check failed: scan backend 'loop' on cpu gives outputs")
    assert "STM_SCAN_BACKEND=torch" in err and "--no-self-check" in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert cli.main(["--limit", "20", "--methods", "stm", "--rates", "0.2", "--quiet", "--out", str(out),
                     "--no-self-check"]) == 0, "skipping the check is the user's choice"


def test_a_broken_backend_stops_the_bench(capsys, broken_loop):
    assert bench.main(["--override", "img_size=16", "--override", "patch_size=4", "--override", "depth=2",
                       "--override", "embed_dim=8", "--methods", "stm", "--rates", "0.2", "--rounds", "1",
                       "--device", "cpu"]) == 2
    assert "self-check failed: scan backend 'loop' on cpu" in capsys.readouterr().err


def test_a_passing_check_is_recorded_in_run_json_and_every_record(tmp_path):
    out = tmp_path / "o"
    assert cli.main(["--limit", "20", "--methods", "stm", "--rates", "0.2", "--quiet", "--out", str(out)]) == 0
    run = json.load(open(os.path.join(out, "run.json")))["self_check"]
    assert run["backend"] == ssm.resolve_backend(None, "cpu") and run["device"] == "cpu" and run["max_rel_error"] <= TOLERANCE
    assert all(r["self_check"] == run for r in json.load(open(os.path.join(out, "results.json"))))


def test_the_check_measures_the_backend_against_the_torch_backend(monkeypatch):
    """loop and torch agree to float32 round-off (far inside the tolerance, but not exactly: two algorithms);
    a loop scan whose state term is off by 1% fails, even on a freshly initialised model whose layers barely move its logits."""
    import stm_fast

    torch.manual_seed(0)
    m = stm_fast.create_model("vim_tiny", img_size=16, patch_size=4, embed_dim=8, depth=2, d_state=4, num_classes=3)
    x = torch.randn(3, 3, 16, 16)
    record = self_check(m.set_scan_backend("loop"), x, torch.device("cpu"), random_weights=True)
    assert record["backend"] == "loop" and 0 < record["max_rel_error"] < 1e-5
    real = scan_loop.scan_loop
    monkeypatch.setattr(scan_loop, "scan_loop", lambda *a, **k: (lambda y, h: (y * 1.01, h))(*real(*a, **k)))
    with pytest.raises(SelfCheckFailed, match="scan backend 'loop' on cpu gives outputs"):
        self_check(m, x, torch.device("cpu"), random_weights=True)


def _tf32(t):
    """float32 values rounded to TF32's 10-bit mantissa (round to nearest), as cuDNN's TF32 convolutions read them."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@pytest.fixture
def tf32_convolutions(monkeypatch):
    """float32 convolutions behave as cuDNN's on a GPU: inputs and weights rounded to TF32 while
    ``torch.backends.cudnn.allow_tf32`` is on (PyTorch's default), exact when it is off; float64 untouched."""
    import torch.nn.functional as F

    real = F.conv2d

    def conv2d(x, w, *args, **kwargs):
        if torch.backends.cudnn.allow_tf32 and x.dtype == torch.float32:
            x, w = _tf32(x), _tf32(w)
        return real(x, w, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", conv2d)
    assert torch.backends.cudnn.allow_tf32, "PyTorch's default, which the emulation stands for"


def _digits_model_and_images():
    from stm_fast import digits

    x, _ = digits.load_test_split("digits")
    return digits.testbed("digits").create_model(digits.shipped_checkpoints("digits")[0]), x[:4]


def test_tf32_convolutions_pass_the_check_of_a_correct_model(tf32_convolutions):
    """With TF32 convolutions emulated, a correct model passes (the float32 part runs with TF32 off), and the
    same emulation is large enough to fail a check that leaves TF32 on (the check before this design)."""
    from stm_fast import selfcheck

    model, x = _digits_model_and_images()
    record = self_check(model, x, torch.device("cpu"))
    assert record["max_rel_error"] <= record["worst_allowed"]
    assert torch.backends.cudnn.allow_tf32, "the check restores the TF32 settings"
    # the check before: the device's float32 run with TF32 on, against the CPU float32 torch backend's error
    reductions = selfcheck._reductions(model)
    want = selfcheck._reference(model, x, reductions)
    on_device, _ = selfcheck._errors(model, x, torch.device("cpu"), reductions, want, "loop")
    with selfcheck.tf32_off():
        base, _ = selfcheck._errors(model, x, torch.device("cpu"), reductions, want, "torch")
    worst, allowed = selfcheck._verdict(on_device, base, selfcheck.TOLERANCE)
    assert on_device[worst] > allowed[worst], "the emulated TF32 error would have failed the old check"


def test_tf32_convolutions_do_not_hide_a_broken_backend(tf32_convolutions, broken_loop):
    """A backend 1% off still fails under emulated TF32 (the float32 part)."""
    model, x = _digits_model_and_images()
    with pytest.raises(SelfCheckFailed, match="scan backend 'loop' on cpu gives outputs"):
        self_check(model, x, torch.device("cpu"))


def test_the_run_precision_is_checked_against_the_same_precision_torch_backend(tf32_convolutions, monkeypatch):
    """Under bf16 autocast a correct backend passes against the torch backend under the same autocast (and
    the record names the backends that ran and the precision); a backend 25% off only under autocast fails (bf16
    itself moves these outputs by ~3e-2, so the allowance there is coarse: the float32 part is the tight one)."""
    model, x = _digits_model_and_images()
    record = self_check(model.set_scan_backend("loop"), x, torch.device("cpu"), precision="bf16")
    assert record["precision"] == "bf16" and record["amp_backend"] == "loop" and record["backend"] == "loop"
    assert record["amp_max_rel_error"] <= record["amp_worst_allowed"]
    real = scan_loop.scan_loop
    wrong = lambda *a, **k: (lambda y, h: (y * (1.25 if torch.is_autocast_enabled("cpu") else 1.0), h))(*real(*a, **k))  # noqa: E731
    monkeypatch.setattr(scan_loop, "scan_loop", wrong)
    with pytest.raises(SelfCheckFailed, match=r"relative, bf16"):
        self_check(model, x, torch.device("cpu"), precision="bf16")
