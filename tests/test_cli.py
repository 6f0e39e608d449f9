"""The command lines do what a user asks: the baseline alone, listings, errors for options that would be
ignored, console scripts, and help that documents every flag (choices and defaults)."""

import json
import os
import re
import sys

import pytest

from stm_fast import bench, train_tiny
from stm_fast.eval import cli as eval_cli
from stm_fast.registry import ALIASES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARSERS = {"stm_fast.eval": eval_cli.build_parser, "stm_fast.bench": bench.build_parser,
           "stm_fast.train_tiny": train_tiny.build_parser}


def test_methods_none_evaluates_the_baseline_alone(tmp_path):
    out = str(tmp_path / "base")
    assert eval_cli.main(["--methods", "none", "--limit", "30", "--quiet", "--out", out]) == 0
    records = json.load(open(os.path.join(out, "results.json")))
    assert {r["method"] for r in records} == {"none"} and len(records) == 3  # one per digits model
    assert all(r["images"] == 30 and r["top1"] is not None for r in records)


@pytest.mark.parametrize("args,named", [
    (["--model", "vim_small"], "--model"), (["--ema"], "--ema"), (["--override", "depth=4"], "--override"),
    (["--model", "vim_tiny_plus", "--ema"], "--model, --ema"),
])
def test_real_model_options_without_a_checkpoint_are_an_error(tmp_path, capsys, args, named):
    """Without --checkpoint the embedded default would run and silently ignore them: refuse, say why and how."""
    out = tmp_path / "o"
    assert eval_cli.main(args + ["--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {named} given without --checkpoint: without a checkpoint (and --data) the embedded "
                          f"digits default runs")
    assert "python -m stm_fast.eval --model NAME --checkpoint FILE.pth --data" in err and len(err.splitlines()) == 1
    assert not out.exists(), "nothing is written"


@pytest.mark.parametrize("main", [eval_cli.main, bench.main])
def test_list_shows_models_and_methods(main, capsys):
    assert main(["--list"]) == 0
    text = capsys.readouterr().out
    for name in ("vim_tiny", "vim_small", "vim_base", "vim_tiny_plus", "vim_small_plus",
                 "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"):
        assert name in text
    assert re.search(r"stm, tome, top, evit", text)


@pytest.mark.parametrize("prog", list(PARSERS))
def test_help_documents_every_flag_with_its_choices_and_default(prog):
    parser = PARSERS[prog]()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{prog} {action.option_strings[0]} has no help"
        formatter = parser._get_formatter()
        formatter.add_argument(action)
        block = formatter.format_help()  # this flag's lines of --help
        if action.choices:  # hustvl's long registry names are shown by --list, which the help must mention
            shown = [str(c) for c in action.choices if c not in ALIASES]
            assert all(c in block for c in shown), f"{prog} {action.option_strings[0]}: choices not shown"
            assert len(shown) == len(action.choices) or "--list" in block
        meaningful = action.default is not None and action.default is not False and action.default != []
        if meaningful and not action.required:
            assert "default" in block, f"{prog} {action.option_strings[0]}: default {action.default!r} not shown"


def test_console_scripts_point_at_the_command_lines():
    scripts = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["scripts"]
    assert set(scripts) == {"stm-eval", "stm-bench", "stm-train-tiny"}
    import importlib

    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))


def test_pytest_reports_why_tests_were_skipped():
    opts = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["tool"]["pytest"]["ini_options"]
    assert "-rs" in opts["addopts"].split()


def test_a_run_says_at_once_that_it_started_and_ends_with_a_summary_even_when_quiet(tmp_path):
    """python -m stm_fast.eval: the first line comes before torch is imported, the next names what is loading
    and where the results go; --quiet keeps the closing summary (wall time, images/s, every output file)."""
    import subprocess
    import sys

    out = tmp_path / "o"
    run = subprocess.run([sys.executable, "-m", "stm_fast.eval", "--limit", "20", "--methods", "stm", "--rates", "0.2",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    lines = run.stdout.splitlines()
    assert run.returncode == 0 and lines[0] == "stm_fast.eval: starting (importing torch)"
    assert lines[1] == f"stm_fast.eval: loading the digits testbed's 3 shipped models and its test split; results will be in {out}"
    quiet = subprocess.run([sys.executable, "-m", "stm_fast.eval", "--limit", "20", "--methods", "stm", "--rates", "0.2",
                            "--out", str(tmp_path / "q"), "--quiet"], capture_output=True, text=True, timeout=600)
    summary = quiet.stdout.splitlines()
    assert quiet.returncode == 0 and len(summary) == 2, quiet.stdout
    assert summary[0].startswith("done in ") and "images/s" in summary[0] and "120 image forwards" in summary[0]
    assert summary[1].startswith(f"results in {tmp_path / 'q'}: ") and "results.json" in summary[1]


def test_the_progress_bar_moves_with_every_configuration_not_only_every_batch(tmp_path, monkeypatch):
    import tqdm

    from stm_fast.eval import cli as ev_cli

    steps, real = [], tqdm.tqdm.update
    monkeypatch.setattr(tqdm.tqdm, "update", lambda self, n=1: (steps.append(n), real(self, n))[1])
    assert ev_cli.main(["--limit", "20", "--methods", "stm", "--rates", "0.2", "--out", str(tmp_path / "o")]) == 0
    assert steps == [1] * 6, "one batch of 20 images, 2 configurations x 3 models: 6 steps of 1"


def test_list_shows_the_testbeds(capsys):
    from stm_fast.eval import cli as ev_cli

    assert ev_cli.main(["--list"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("testbeds"))
    assert "digits" in line and "paper-geometry" in line and "fashion-mnist" in line


def test_every_eval_option_becomes_an_evalconfig_field_by_name():
    """parse_args builds EvalConfig by field name: the parsed options are the fields (the --stm-* ones make
    stm_options), and an option added without a field is caught at once."""
    args = eval_cli.build_parser().parse_args(["--quiet", "--stm-sides", "left"])
    config = eval_cli.parse_args(["--quiet", "--stm-sides", "left"])
    fields = set(config.__dataclass_fields__)
    for name, value in vars(args).items():
        if name.startswith("stm_"):
            assert config.stm_options[name[4:]] == value
        elif name != "list":
            assert name in fields, f"--{name.replace('_', '-')} has no EvalConfig field"
    args.new_flag = True
    with pytest.raises(AssertionError, match="new_flag"):
        eval_cli.config_from(args)
