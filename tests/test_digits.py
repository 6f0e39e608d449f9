"""The embedded default: shipped digits models, their reproducibility, and the default eval run."""

import json
import os

import pytest
import torch

from stm_fast import digits, eval as ev
from stm_fast.checkpoint import read_state_dict
from stm_fast.train_tiny import evaluate, train


def test_split_is_fixed_and_stratified():
    x_tr, y_tr, x_te, y_te = digits.load_split()
    assert x_tr.shape == (1437, 1, 8, 8) and x_te.shape == (360, 1, 8, 8)
    assert torch.bincount(y_te).min() >= 35, "every digit is in the test split"
    assert float(x_te.min()) >= -1 and float(x_te.max()) <= 1
    again = digits.load_split()[2]
    assert torch.equal(again, x_te)


@pytest.mark.parametrize("seed", digits.SEEDS)
def test_shipped_models_load_safely_and_reach_95_percent(seed):
    """Each shipped model loads strictly with weights_only=True and scores >= 95% on the 360 test images."""
    path = digits.checkpoint_path(seed)
    assert os.path.getsize(path) < 1_000_000
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["config"] == digits.DIGITS_CONFIG and ckpt["meta"]["seed"] == seed
    model = digits.create_digits_model(path)
    assert sum(p.numel() for p in model.parameters()) < 100_000
    _, _, x, y = digits.load_split()
    acc = evaluate(model, x, y)
    assert acc >= 0.95, f"seed {seed}: {100 * acc:.1f}%"
    assert acc == pytest.approx(ckpt["meta"]["test_accuracy"], abs=1 / 360), "the recorded accuracy is reproduced"
    assert read_state_dict(path).keys() == model.state_dict().keys()


def test_training_is_deterministic(tmp_path):
    """Two trainings with the same seed give bitwise identical weights (checked on the first 6 steps)."""
    a = train(3, epochs=1, out=str(tmp_path / "a.pth"), progress=False, max_steps=6)
    b = train(3, epochs=1, out=str(tmp_path / "b.pth"), progress=False, max_steps=6)
    sa, sb = (torch.load(p, weights_only=True)["model"] for p in (a[2], b[2]))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = train(4, epochs=1, out=str(tmp_path / "c.pth"), progress=False, max_steps=6)
    sc = torch.load(c[2], weights_only=True)["model"]
    assert not all(torch.equal(sa[k], sc[k]) for k in sa), "another seed trains another model"


def test_default_run_reports_mean_and_range_over_three_models(tmp_path):
    out = str(tmp_path / "run")
    assert ev.main(["--out", out, "--methods", "stm", "stm-oneside", "tome", "--rates", "0.2", "--quiet"]) == 0
    records = json.load(open(os.path.join(out, "results.json")))
    assert sorted({r["model"] for r in records}) == ["digits-seed0", "digits-seed1", "digits-seed2"]
    assert all(r["images"] == 360 for r in records if not r.get("error"))
    base = {r["model"]: r["top1"] for r in records if r["method"] == "none"}
    assert all(v >= 95 for v in base.values())
    table = open(os.path.join(out, "table.md")).read()
    assert "mean [min, max] over models (digits-seed0, digits-seed1, digits-seed2)" in table
    assert "stm (one side (left), lsq weights)" in table
    # one meaning of a schedule everywhere: tokens removed after each layer in total (1 per side here)
    assert ev.main(["--out", str(tmp_path / "s"), "--methods", "stm", "--schedule", "2", "--quiet"]) == 0
    sched = [r for r in json.load(open(os.path.join(tmp_path / "s", "results.json"))) if r["method"] == "stm"]
    assert sched and all(r["schedule"] == 2 and r["tokens_per_layer"][1] == 63 for r in sched)
    assert "| **stm (both sides, lsq weights)** | schedule 2 |" in open(os.path.join(tmp_path / "s", "table.md")).read()
