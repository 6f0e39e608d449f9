"""The embedded testbeds: their data, the shipped models of both, training's reproducibility, the default run."""

import json
import os

import numpy as np
import pytest
import torch

from stm_fast import digits, eval as ev
from stm_fast.checkpoint import read_state_dict
from stm_fast.train_tiny import evaluate, train
from tests.builders import shipped_half_checkpoint


def test_split_is_fixed_and_stratified():
    x_tr, y_tr, x_te, y_te = digits.load_split()
    assert x_tr.shape == (1437, 1, 8, 8) and x_te.shape == (360, 1, 8, 8)
    assert torch.bincount(y_te).min() >= 35, "every digit is in the test split"
    assert float(x_te.min()) >= -1 and float(x_te.max()) <= 1
    again = digits.load_split()[2]
    assert torch.equal(again, x_te)


def test_paper_geometry_images_fill_the_frame_so_the_borders_carry_the_digit():
    """197 tokens (14 x 14 patches of 2 x 2 + class token) and 24 layers, like Vim-Ti; every test image has ink
    (above the background's -1) in its top and bottom patch rows, the tokens STM merges first."""
    bed = digits.testbed("paper-geometry")
    model = bed.create_model()
    assert model.cfg.num_tokens == 197 and model.cfg.depth == 24 and model.cfg.cls_position == 98
    x_tr, y_tr, x_te, y_te = digits.load_split("paper-geometry")
    assert x_tr.shape == (1437, 1, 28, 28) and x_te.shape == (360, 1, 28, 28)
    assert torch.equal(y_te, digits.load_split()[3]), "the same test digits as the digits testbed"
    assert float(x_te.min()) >= -1 and float(x_te.max()) <= 1
    ink = x_te > -0.5
    for rows in (slice(0, 2), slice(26, 28)):
        assert bool(ink[:, 0, rows].flatten(1).any(1).all()), "strokes reach the top and bottom rows of every image"
    jittered = digits.fill_frame(digits.raw_split()[0][:8], 28, 0.6, np.random.default_rng(0))
    assert not torch.equal(jittered, x_tr[:8]) and jittered.shape == (8, 1, 28, 28)


@pytest.mark.parametrize("name", list(digits.TESTBEDS))
def test_a_testbeds_model_config_is_the_config_of_the_models_it_creates(name):
    """What the eval reads off a testbed without building a model (its token count, for --paper) is what
    create_model builds: Vim-Ti's configuration with the testbed's changes."""
    bed = digits.testbed(name)
    assert bed.model_config == bed.create_model().cfg
    assert bed.model_config.depth == bed.config["depth"] and bed.model_config.embed_dim == bed.config["embed_dim"]


@pytest.mark.parametrize("seed", digits.SEEDS)
def test_shipped_paper_geometry_models_reach_95_percent_with_float16_weights(seed):
    """Each shipped paper-geometry model loads with weights_only=True, holds float16 weights (under 1 MB),
    records how it was trained, and scores >= 95% on the 360 test images, as recorded."""
    bed = digits.testbed("paper-geometry")
    ckpt = shipped_half_checkpoint(bed, seed)
    model = bed.create_model(bed.checkpoint_path(seed))
    _, _, x, y = digits.load_split("paper-geometry")
    acc = evaluate(model, x, y)
    assert acc >= 0.95, f"seed {seed}: {100 * acc:.1f}%"
    assert acc == pytest.approx(ckpt["meta"]["test_accuracy"], abs=1 / 360), "the recorded accuracy is reproduced"
    assert abs(ckpt["meta"]["test_accuracy_float32"] - acc) <= 2 / 360, "float16 storage costs at most 2 images"


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


def test_paper_geometry_training_is_deterministic_and_runs_on_the_compiled_training_scan(tmp_path, monkeypatch):
    """Two 2-step trainings of the same seed give identical weights, through the fused training kernel."""
    from stm_fast.ops import scan_fused

    if not scan_fused.available()[0]:
        pytest.skip("the fused kernel cannot be built here")
    calls = {"n": 0}
    real = scan_fused.TrainScanFunction.apply
    monkeypatch.setattr(scan_fused.TrainScanFunction, "apply",
                        lambda *a: (calls.__setitem__("n", calls["n"] + 1), real(*a))[1])
    a = train(5, out=str(tmp_path / "a.pth"), progress=False, max_steps=2, testbed_name="paper-geometry")
    b = train(5, out=str(tmp_path / "b.pth"), progress=False, max_steps=2, testbed_name="paper-geometry")
    sa, sb = (torch.load(p, weights_only=True)["model"] for p in (a[2], b[2]))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert calls["n"] == 2 * 2 * 48, "every direction of every layer trained through the compiled kernel"


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


def test_the_paper_geometry_testbed_runs_the_grid_and_the_papers_settings(tmp_path):
    """--testbed paper-geometry evaluates its three shipped models (a few images here), and --paper runs the
    paper's literal Table 2 / 3 schedules on it unchanged (197 tokens, 24 layers)."""
    out = str(tmp_path / "grid")
    assert ev.main(["--testbed", "paper-geometry", "--out", out, "--methods", "stm", "stm-weights", "--rates", "0.2",
                    "--limit", "12", "--quiet", "--no-self-check"]) == 0
    records = json.load(open(os.path.join(out, "results.json")))
    assert sorted({r["model"] for r in records}) == [f"paper-geometry-seed{s}" for s in digits.SEEDS]
    assert all(r["tokens_per_layer"][0] == 197 and len(r["tokens_per_layer"]) == 24 for r in records)
    assert any(c["claim"] == "HSP vs plain average" for c in json.load(open(os.path.join(out, "claims.json"))))
    out = str(tmp_path / "paper")
    assert ev.main(["--testbed", "paper-geometry", "--paper", "--methods", "tome", "--out", out, "--limit", "6",
                    "--quiet", "--no-self-check"]) == 0
    stm = {(json.dumps(r["schedule"]), r["options"]["sides"]) for r in json.load(open(os.path.join(out, "results.json")))
           if r["method"] == "stm"}
    assert stm == {("4", "both"), ("4", "left"), ("2", "both"), ("2", "left")}
