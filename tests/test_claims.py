"""Paired statistics, the claims they decide, the paper's recovered settings, and the eval's figures."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import stm_fast
from stm_fast.eval import cli
from stm_fast.eval.claims import claims, describe
from stm_fast.eval.grid import exp_key
from stm_fast.eval.paper import TABLE2_GFLOPS, table2_schedule
from stm_fast.eval.stats import agreement, paired_difference, verdict


def test_identical_configurations_differ_by_exactly_nothing():
    a = np.array([1, 0, 1, 1, 0, 1])
    s = paired_difference(a, a)
    assert (s["diff"], s["ci_low"], s["ci_high"], s["p_value"], s["discordant"]) == (0.0, 0.0, 0.0, 1.0, 0)
    assert verdict(s["diff"], s["p_value"]) == "inconclusive"


def test_the_difference_and_its_interval_are_in_points_and_cover_the_difference():
    rng = np.random.default_rng(0)
    b = rng.random(400) < 0.7
    a = b | (rng.random(400) < 0.3)  # a gets every image b gets, and some more
    s = paired_difference(a, b)
    assert s["diff"] == pytest.approx(100 * (a.mean() - b.mean()))
    assert s["ci_low"] <= s["diff"] <= s["ci_high"] and s["ci_low"] > 0
    assert s["p_value"] < 1e-6 and verdict(s["diff"], s["p_value"]) == "supported"
    r = paired_difference(b, a)
    assert r["diff"] == -s["diff"] and verdict(r["diff"], r["p_value"]) == "contradicted"
    assert paired_difference(a, b) == s, "a fixed seed: reruns give identical numbers"


def test_the_interval_is_scipys_paired_bootstrap_of_the_two_accuracies():
    """Resampling the per-image differences is the paired bootstrap of mean(a) - mean(b): scipy's own
    paired two-sample form gives the same interval up to resampling noise (a few tenths of a point here)."""
    from scipy import stats
    rng = np.random.default_rng(3)
    a = (rng.random(360) < 0.85).astype(float)
    b = np.where(rng.random(360) < 0.15, 1 - a, a)
    s = paired_difference(a, b)
    ref = stats.bootstrap((a, b), lambda x, y, axis=-1: 100 * (x.mean(axis) - y.mean(axis)), paired=True,
                          vectorized=True, n_resamples=9999, method="percentile", random_state=np.random.default_rng(7))
    assert s["ci_low"] == pytest.approx(ref.confidence_interval.low, abs=0.6)
    assert s["ci_high"] == pytest.approx(ref.confidence_interval.high, abs=0.6)
    assert s["ci_high"] - s["ci_low"] > 2.0, "not a degenerate interval"


def test_mcnemar_counts_only_the_discordant_images():
    """30 images both right, 10 both wrong: they do not move the p-value; 6 vs 2 discordant pairs do."""
    a = np.array([1] * 30 + [0] * 10 + [1] * 6 + [0] * 2)
    b = np.array([1] * 30 + [0] * 10 + [0] * 6 + [1] * 2)
    s = paired_difference(a, b)
    assert s["discordant"] == 8
    # exact two-sided binomial over 8 discordant pairs with 2 on one side: 2 * (1 + 8 + 28) / 256
    assert s["p_value"] == pytest.approx(2 * (1 + 8 + 28) / 256)
    assert verdict(s["diff"], s["p_value"]) == "inconclusive"


def test_agreement_counts_the_same_top1_on_valid_images():
    assert agreement([1, 2, 3, 4], [1, 2, 0, 4], [True, True, True, False]) == pytest.approx(200 / 3)
    assert agreement([1], [2], [False]) is None


def _synthetic(n=200, models=("m0", "m1")):
    """Predictions where STM is right on every image, the plain average on half, one side on none."""
    stm = {"sides": "both", "positions": "ends", "weights": "lsq", "start_layer": 0}
    exps = [("none", 0.0, None, {}), ("stm", 0.2, None, stm), ("stm", 0.2, None, {**stm, "weights": "avg"}),
            ("stm", 0.2, None, {**stm, "weights": "drop"}), ("stm", 0.2, None, {**stm, "sides": "left"}),
            ("tome", 0.2, None, {})]
    labels = np.arange(n) % 10
    right, half, wrong = labels, np.where(np.arange(n) % 2 == 0, labels, -5), np.full(n, -5)
    per = {"none": right, "stm": right, "avg": half, "drop": right, "left": wrong, "tome": half}
    preds = {}
    for m in models:
        for e in exps:
            tag = e[0] if e[0] != "stm" else ("left" if e[3]["sides"] == "left" else
                                               e[3]["weights"] if e[3]["weights"] != "lsq" else "stm")
            preds[exp_key(m, e)] = per[tag]
    return exps, {m: labels for m in models}, preds, stm


def test_claims_have_verdicts_per_model_and_pooled():
    exps, labels, preds, stm = _synthetic()
    found = claims(["m0", "m1"], exps, labels, preds, stm)
    by = {(r["claim"], r["model"]): r for r in found}
    assert set(r["claim"] for r in found) == {"HSP vs plain average", "HSP vs drop", "both sides vs one side", "STM vs tome"}
    assert by[("HSP vs plain average", "m0")]["verdict"] == "supported" and by[("HSP vs plain average", "m0")]["diff"] == 50
    assert by[("HSP vs drop", "m1")]["verdict"] == "inconclusive" and by[("HSP vs drop", "m1")]["diff"] == 0
    pooled = by[("both sides vs one side", "pooled (2 models)")]
    assert pooled["n_images"] == 400 and pooled["diff"] == 100 and pooled["verdict"] == "supported"
    for r in found:
        assert set(r) == {"claim", "model", "rate", "a", "b", "diff", "ci_low", "ci_high", "p_value", "verdict", "n_images"}
    assert by[("STM vs tome", "m0")]["a"] == "stm (both sides, lsq weights)" and by[("STM vs tome", "m0")]["b"] == "tome"


def test_the_default_stm_configuration_is_named_fully():
    assert describe("stm", {}) == "stm (both sides, lsq weights)"
    assert describe("stm", {"sides": "right", "weights": "avg"}) == "stm (one side (right), avg weights)"


@pytest.mark.parametrize("model", ["vim_tiny", "vim_small", "vim_base"])
def test_inferred_table2_schedules_give_the_reported_flops(model):
    """The paper's Table 2 FLOPs (1.28 / 4.23 / 15.73 G) follow from the inferred schedules, to the table's
    precision; the text's "two tokens per direction at every layer" gives other FLOPs (1.117 G on Vim-Ti)."""
    cfg = stm_fast.registry.MODEL_CONFIGS[model]
    inferred = stm_fast.flops(cfg, reduction=stm_fast.make_reduction(cfg, "stm", schedule=table2_schedule(model, "inferred")))
    assert inferred["total"] == pytest.approx(TABLE2_GFLOPS[model], abs=0.0075)
    literal = stm_fast.flops(cfg, reduction=stm_fast.make_reduction(cfg, "stm", schedule=table2_schedule(model, "literal")))
    assert abs(literal["total"] - TABLE2_GFLOPS[model]) > 0.05
    if model == "vim_tiny":
        assert literal["total"] == pytest.approx(1.117, abs=5e-4)


@pytest.fixture(scope="module")
def vim_tiny_run(tmp_path_factory):
    """A random-weight Vim-Ti checkpoint in the official format and one ImageNet-layout image."""
    root = tmp_path_factory.mktemp("paper")
    torch.manual_seed(0)
    torch.save({"model": stm_fast.create_model("vim_tiny").state_dict()}, root / "vim_t.pth")
    (root / "val" / "n01440764").mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(
        root / "val" / "n01440764" / "a.JPEG")
    return root


def test_paper_settings_run_table2_and_table3(vim_tiny_run):
    out = str(vim_tiny_run / "out")
    assert cli.main(["--model", "vim_tiny", "--checkpoint", str(vim_tiny_run / "vim_t.pth"), "--data",
                     str(vim_tiny_run / "val"), "--paper", "inferred", "--methods", "tome", "--out", out, "--quiet"]) == 0
    records = json.load(open(os.path.join(out, "results.json")))
    got = {(r["method"], r["options"].get("sides"), r["rate"], json.dumps(r["schedule"])) for r in records}
    assert ("stm", "both", None, "2") in got and ("stm", "left", None, "2") in got, "Table 2 / Table 3's 15%: one per side"
    assert ("stm", "both", None, "4") in got, "Table 3's 20%: the text's two per side"
    assert ("stm", "both", 0.3, "null") in got and ("stm", "left", 0.4, "null") in got
    stm2 = next(r for r in records if r["method"] == "stm" and r["schedule"] == 2 and r["options"]["sides"] == "both")
    assert stm2["gflops_paper"] == pytest.approx(1.283, abs=5e-4)
    tome = next(r for r in records if r["method"] == "tome")
    assert tome["rate"] == pytest.approx(stm2["achieved_rate"], abs=1e-4), "the peers run at STM's achieved rate"
    found = json.load(open(os.path.join(out, "claims.json")))
    assert any(c["claim"] == "STM vs tome" for c in found), "a peer at a rate is paired with STM at its schedule"


def test_eval_records_and_claims_and_the_figures(tmp_path):
    out = str(tmp_path / "o")
    assert cli.main(["--methods", "stm", "stm-weights", "stm-oneside", "mtr", "--rates", "0.2", "--limit", "30",
                     "--quiet", "--figures", "--out", out]) == 0
    records = json.load(open(os.path.join(out, "results.json")))
    base = [r for r in records if r["method"] == "none"]
    assert all(r["agreement"] == 100.0 and r["vs_baseline"]["diff"] == 0.0 for r in base)
    for r in records:
        assert r["vs_baseline"]["ci_low"] <= r["vs_baseline"]["diff"] <= r["vs_baseline"]["ci_high"]
        assert 0 <= r["agreement"] <= 100
    found = json.load(open(os.path.join(out, "claims.json")))
    assert {c["claim"] for c in found} == {"HSP vs plain average", "HSP vs drop", "both sides vs one side", "STM vs mtr"}
    assert sum(c["model"] == "pooled (3 models)" for c in found) == 4
    table = open(os.path.join(out, "table.md")).read()
    rows = [line.split(" | ") for line in table.splitlines() if " | 20% | " in line]
    means = [float(row[3].strip("*").split(" ")[0]) for row in rows]
    bold = [m for row, m in zip(rows, means) if row[0].startswith("| **")]
    assert bold and bold[0] == max(means), "the best method at the rate is the bold one"
    assert "images/s" not in table and "Δ top-1 vs baseline [95% CI]" in table
    for name in ("accuracy_vs_flops.png", "figure1_digits-seed0_image0.png", "figure3_layer_losses.png"):
        assert open(os.path.join(out, name), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
