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
