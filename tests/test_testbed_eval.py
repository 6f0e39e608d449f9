"""What an eval of an embedded testbed runs: every shipped seed, the testbed's own default grid, the paper's
per-layer schedules where the geometry allows them, and STM's regime beside the paper's Vim-Ti figures."""

import json

import pytest
import torch

from stm_fast import digits
from stm_fast.eval import cli
from stm_fast.eval.cli import main, parse_args
from stm_fast.eval.grid import DEFAULT_GROUPS, DEFAULT_RATES, describe_grid, experiments
from stm_fast.eval.inputs import load_models
from stm_fast.eval.regime import regime_table
from stm_fast.reduction import STM_DEFAULTS


@pytest.mark.parametrize("name", list(digits.TESTBEDS))
def test_every_shipped_seed_of_a_testbed_is_evaluated(name, tmp_path, monkeypatch):
    """One model per seed the testbed ships (fashion-mnist has five where the digits beds have three)."""
    monkeypatch.setattr(digits, "DATA_DIR", str(tmp_path))
    bed = digits.testbed(name)
    for s in bed.seeds:
        torch.manual_seed(s)
        torch.save(bed.create_model().state_dict(), bed.checkpoint_path(s))
    args = parse_args(["--testbed", name, "--out", str(tmp_path / "run")])
    models = load_models(args, torch.device("cpu"))
    assert [n for n, _ in models] == [bed.model_name(s) for s in bed.seeds]


def test_fashion_mnists_default_grid_runs_every_group_at_20_percent_and_stm_alone_elsewhere(tmp_path):
    args = parse_args(["--testbed", "fashion-mnist", "--out", str(tmp_path)])
    assert args.grid == digits.FASHION_EVAL_GRID
    cfg = digits.testbed("fashion-mnist").create_model().cfg
    exps, notes = experiments(args.grid, dict(STM_DEFAULTS), cfg)
    at_20 = [e for e in exps if e.point == 0.2]
    elsewhere = [e for e in exps if e.method != "none" and e.point != 0.2]
    assert not notes and {e.method for e in at_20} >= {"stm", "tome", "top", "evit", "mtr"} and len(at_20) == 26
    assert {e.point for e in elsewhere} == {0.15, 0.3, 0.4, "schedule 4"}
    assert all(e.method == "stm" and e.opts == dict(STM_DEFAULTS) for e in elsewhere)
    assert set(args.methods) == set(DEFAULT_GROUPS) and args.rates == (0.2, 0.15, 0.3, 0.4)


@pytest.mark.parametrize("argv, grid", [
    (["--rates", "0.2"], ((DEFAULT_GROUPS, (0.2,), None),)),
    (["--methods", "stm"], ((("stm",), DEFAULT_RATES, None),)),
    (["--schedule", "4"], ((DEFAULT_GROUPS, (), 4),)),
])
def test_naming_methods_rates_or_a_schedule_replaces_a_testbeds_own_grid(argv, grid, tmp_path):
    assert parse_args(["--testbed", "fashion-mnist", *argv, "--out", str(tmp_path)]).grid == grid


def test_the_digits_default_grid_is_every_default_group_at_every_default_rate(tmp_path):
    args = parse_args(["--out", str(tmp_path)])
    assert args.grid == ((DEFAULT_GROUPS, DEFAULT_RATES, None),)
    assert args.methods == DEFAULT_GROUPS and args.rates == DEFAULT_RATES


def test_paper_literal_runs_on_fashion_mnist_but_sensitivity_needs_24_layers(tmp_path, capsys):
    assert parse_args(["--testbed", "fashion-mnist", "--paper", "--out", str(tmp_path)]).paper == "literal"
    assert main(["--testbed", "fashion-mnist", "--paper", "sensitivity", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "12 layers" in err and "--paper literal" in err
    assert main(["--testbed", "digits", "--paper", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "65 tokens" in err and "paper-geometry or fashion-mnist" in err


def test_the_papers_schedules_apply_to_testbeds_with_197_tokens_whatever_their_name(monkeypatch):
    """Vim-Ti has 14 x 14 patches and a class token: a 14 x 14 grid of any patch size qualifies, 8 x 8 does not."""
    beds = {"a": digits.Testbed("a", dict(img_size=14, patch_size=1), "a", None, None),
            "b": digits.Testbed("b", dict(img_size=16, patch_size=2), "b", None, None),
            "c": digits.Testbed("c", dict(img_size=28, patch_size=2, depth=3), "c", None, None)}
    monkeypatch.setattr(cli, "TESTBEDS", beds)
    assert cli._paper_testbeds() == ("a", "c")


def test_describe_grid_names_each_block_in_words():
    grid = ((None, (0.2,), None), (("stm", "tome"), (0.15, 0.3), None), (("stm",), (), [4, 0]))
    assert describe_grid(grid) == "every default group at 0.2; stm tome at 0.15 0.3; stm at --schedule [4, 0]"


def test_the_help_describes_each_testbeds_own_grid_from_the_grid_itself():
    text = " ".join(cli.build_parser().format_help().split())
    for name, bed in digits.TESTBEDS.items():
        if bed.eval_grid:
            assert f"--testbed {name}, which without --methods and --rates runs {describe_grid(bed.eval_grid)}" in text


def _rec(method, rate, schedule, label, diff, achieved, top1=80.0):
    return {"method": method, "rate": rate, "schedule": schedule, "label": label, "achieved_rate": achieved,
            "top1": top1, "vs_baseline": {"diff": diff}}


def test_the_regime_table_sets_each_stm_row_beside_the_papers_column_of_its_name_or_schedule():
    """Table 3 of the paper, Vim-Ti both sides: -1.0 / -1.1 / -2.8 / -3.9 at its "15/20/30/40%", which merge
    schedules 2, 4, 4, 4; a rate row meets the column of its name, a schedule row the columns of its schedule."""
    stm = "stm (both sides, lsq weights)"
    records = [_rec("none", None, None, "none", None, 0.0, 90.0),
               _rec("stm", 0.3, None, stm, -5.0, 0.3), _rec("stm", None, 4, stm, -1.0, 0.11),
               _rec("stm", None, [4, 0], stm, -0.5, 0.05), _rec("tome", 0.3, None, "tome", -9.0, 0.3),
               _rec("stm", 0.3, None, "stm (both sides, uniform positions)", -20.0, 0.3)]
    pooled = {(stm, "0.3"): {"diff": -5.0, "ci_low": -6.0, "ci_high": -4.0}}
    text = regime_table(records, dict(STM_DEFAULTS), pooled)
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    rows = {line.split("|")[1].strip(): line for line in lines}
    assert len(lines) == 1 + 3, "a header and STM with the run's own options only (not a control's)"
    assert '-2.8 (its "30%", schedule 4)' in rows["30%"] and "-5.00 [-6.00, -4.00]" in rows["30%"]
    assert '-1.1 / -2.8 / -3.9 (its "20%"/"30%"/"40%")' in rows["schedule 4"]
    assert rows["schedule [4, 0]"].rstrip(" |").endswith("—") and "tome" not in rows
    assert "90.00%" in text
    assert regime_table(records[:1] + records[-2:], dict(STM_DEFAULTS), pooled) == ""


def test_the_regime_rows_give_the_methods_t_interval_over_seeds_and_the_loss_as_a_multiple_of_the_papers():
    """Three networks lose 4, 5 and 6 points at 30%: mean -5, t-interval -5 -+ t(0.975, 2) * 1 / sqrt(3) =
    [-7.48, -2.52]; the pooled -5.0 is 1.8 times the paper's -2.8 at its "30%"; a schedule has no ratio."""
    stm = "stm (both sides, lsq weights)"
    records = [_rec("none", None, None, "none", None, 0.0, 90.0)] + \
        [_rec("stm", 0.3, None, stm, d, 0.3) for d in (-4.0, -5.0, -6.0)] + [_rec("stm", None, 4, stm, -1.0, 0.11)]
    pooled = {(stm, "0.3"): {"diff": -5.0, "ci_low": -6.0, "ci_high": -4.0}}
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in regime_table(records, dict(STM_DEFAULTS), pooled).splitlines() if line.startswith("| ")}
    assert rows["30%"][2:4] == ["-5.00 [-7.48, -2.52]", "[-6.00, -4.00]"] and rows["30%"][-1] == "1.8x"
    assert rows["schedule 4"][2] == "n/a" and rows["schedule 4"][-1] == "—"


def test_fashion_mnist_runs_from_the_shipped_test_images_and_writes_the_regime_section(tmp_path):
    """The embedded eval of every shipped fashion-mnist model on the first images of the packaged test split
    (nothing else read), with STM's regime rows in table.md beside the paper's column of the same name."""
    out = tmp_path / "run"
    assert main(["--testbed", "fashion-mnist", "--methods", "stm", "tome", "--rates", "0.2", "0.3", "--limit", "12",
                 "--quiet", "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    regime = table[table.index("STM's losses here"):]
    assert '-1.1 (its "20%", schedule 4)' in regime and '-2.8 (its "30%", schedule 4)' in regime
    assert "tome" not in regime
    records = json.loads((out / "results.json").read_text())
    bed = digits.testbed("fashion-mnist")
    assert {r["model"] for r in records} == {bed.model_name(s) for s in bed.seeds}
    assert {r["images"] for r in records} == {12}
