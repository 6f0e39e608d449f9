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
