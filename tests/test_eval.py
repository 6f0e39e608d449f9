"""End-to-end tests of ``python -m stm_fast.eval`` on data the tests make."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import stm_fast
from stm_fast import eval as ev
from tests.builders import OVERRIDES

FAST = ["--methods", "stm", "tome", "--rates", "0.1", "0.2", "--quiet", "--batch-size", "4"]


def run(args):
    """The CLI in-process; returns (exit code, records or None)."""
    code = ev.main(args)
    out = args[args.index("--out") + 1]
    path = os.path.join(out, "results.json")
    return code, (json.load(open(path)) if code == 0 and os.path.exists(path) else None)


def _cells(records):
    return {(r["method"], r["rate"], json.dumps(r["options"], sort_keys=True)): (r["top1"], r["top5"], r["images"])
            for r in records}


def test_imagefolder_run_writes_every_output(tmp_path, checkpoint, folders):
    tree, _, _ = folders
    out = str(tmp_path / "run")
    code, recs = run(["--checkpoint", checkpoint, "--data", tree, "--out", out, *OVERRIDES, *FAST])
    assert code == 0
    assert {"results.json", "results.csv", "table.md", "accuracy_vs_flops.png", "run.json"} <= set(os.listdir(out))
    base = [r for r in recs if r["method"] == "none"]
    assert len(base) == 1 and base[0]["images"] == 12 and base[0]["bad_images"] == 1
    (bad,) = base[0]["bad_image_files"]
    assert bad.startswith(os.path.join(tree, "n01440764", "broken.JPEG") + ": "), "the file and the reason are reported"
    assert len(recs) == 5
    for r in recs:
        assert set(r) >= {"model", "method", "rate", "achieved_rate", "options", "top1", "top5", "images", "bad_images",
                          "gflops_paper", "gflops_full", "images_per_s"}
        if r["method"] != "none":
            assert abs(r["achieved_rate"] - r["rate"]) <= 0.01 and r["gflops_paper"] < base[0]["gflops_paper"]
    table = open(os.path.join(out, "table.md")).read()
    assert "baseline (no reduction)" in table and "| tome |" in table and "1 unreadable image(s) excluded" in table


def test_flat_folder_with_labels_scores_the_same_images_identically(tmp_path, checkpoint, folders):
    tree, flat, labels = folders
    _, a = run(["--checkpoint", checkpoint, "--data", tree, "--out", str(tmp_path / "a"), *OVERRIDES, *FAST])
    _, b = run(["--checkpoint", checkpoint, "--data", flat, "--labels", labels, "--out", str(tmp_path / "b"), *OVERRIDES, *FAST])
    assert _cells(a) == _cells(b)


def test_bad_image_can_fail_the_run(tmp_path, checkpoint, folders, capsys):
    code, _ = run(["--checkpoint", checkpoint, "--data", folders[0], "--out", str(tmp_path / "x"), "--on-bad-image", "error",
                   *OVERRIDES, *FAST])
    assert code == 2 and "broken.JPEG" in capsys.readouterr().err


def test_interrupted_run_resumes_without_recomputing(tmp_path, checkpoint, folders, monkeypatch):
    tree = folders[0]
    full = str(tmp_path / "full")
    _, expected = run(["--checkpoint", checkpoint, "--data", tree, "--out", full, *OVERRIDES, *FAST, "--no-self-check"])
    calls = {"n": 0}
    real = stm_fast.vim.VisionMamba.forward

    def flaky(self, x, observer=None):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(self, x, observer)

    monkeypatch.setattr(stm_fast.vim.VisionMamba, "forward", flaky)
    monkeypatch.setattr(stm_fast.eval.run, "hsp_weights", lambda run, dataset: {})  # its forwards are not the grid's
    out = str(tmp_path / "resumed")
    # the self-check's own forwards would be counted too; it has its own tests (tests/test_selfcheck.py)
    args = ["--checkpoint", checkpoint, "--data", tree, "--out", out, *OVERRIDES, *FAST, "--no-self-check"]
    code, _ = run(args)
    assert code == 130 and not os.path.exists(os.path.join(out, "results.json"))
    before = calls["n"]
    code, resumed = run(args)
    assert code == 0
    n_cfg = len(expected)  # the baseline and 4 reduced configurations
    n_batches = 4  # 13 files, batch 4
    # the interrupt came during batch 1: batch 0 was saved and is not recomputed; batch 1 (in flight) is redone
    assert calls["n"] - before == n_cfg * (n_batches - 1), "finished batches are not recomputed"
    assert _cells(resumed) == _cells(expected)


def test_resume_refuses_other_settings(tmp_path, checkpoint, folders, capsys):
    out = str(tmp_path / "r")
    assert run(["--checkpoint", checkpoint, "--data", folders[0], "--out", out, *OVERRIDES, *FAST])[0] == 0
    code, _ = run(["--checkpoint", checkpoint, "--data", folders[0], "--out", out, "--limit", "5", *OVERRIDES, *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "holds a run of other inputs (the image list (names, sizes or labels), limit (None -> 5) changed)" in err
    assert "--restart" in err


@pytest.mark.parametrize("gpu_host", [False, True], ids=["cpu_host", "cuda_host_device_cpu"])
def test_two_process_run_equals_single_process(tmp_path, checkpoint, folders, gpu_host):
    """torchrun with 2 processes gives the single-process numbers, also on a host where CUDA exists but the
    eval runs on the CPU (the process group must carry CPU tensors: an NCCL group crashed at the end there)."""
    tree = folders[0]
    _, single = run(["--checkpoint", checkpoint, "--data", tree, "--out", str(tmp_path / "one"), *OVERRIDES, *FAST])
    out = str(tmp_path / "two")
    env = {k: v for k, v in os.environ.items() if k != "STM_DIST_BACKEND"}
    env["OMP_NUM_THREADS"] = "1"
    launcher = tmp_path / "launch.py"
    launcher.write_text("import sys, torch\n"
                        + ("torch.cuda.is_available = lambda: True  # a GPU host running the eval on its CPU\n" if gpu_host else "")
                        + "from stm_fast.eval.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={29531 + gpu_host}", str(launcher), "--checkpoint", checkpoint, "--data", tree,
                           "--out", out, "--device", "cpu", *OVERRIDES, *FAST], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.load(open(os.path.join(out, "results.json")))
    assert _cells(two) == _cells(single)
    assert {"progress.rank0.json", "progress.rank1.json"} <= set(os.listdir(out))


@pytest.mark.parametrize("make_args,message", [
    (lambda c, f, t: ["--checkpoint", c, "--data", str(t / "nope")], "no such folder"),
    (lambda c, f, t: ["--checkpoint", c, "--data", str(t / "empty")], "no images found"),
    (lambda c, f, t: ["--checkpoint", c], "needs both --checkpoint and --data"),
    (lambda c, f, t: ["--checkpoint", c, "--data", f[1]], "pass --labels"),
    (lambda c, f, t: ["--checkpoint", c, "--data", f[1], "--labels", str(t / "wrong.csv")], "does not match the images"),
    (lambda c, f, t: ["--checkpoint", c, "--data", f[0], "--model", "vim_small"], "looks like"),
    (lambda c, f, t: ["--checkpoint", str(t / "missing.pth"), "--data", f[0]], "checkpoint file not found"),
    (lambda c, f, t: ["--checkpoint", c, "--data", f[0], "--rates", "20"], "(a fraction: 0.2 means 20%)"),
])
def test_bad_input_is_a_clear_error_before_any_work(tmp_path, checkpoint, folders, capsys, make_args, message):
    (tmp_path / "wrong.csv").write_text("filename,label\nother.JPEG,n01440764\n")
    (tmp_path / "empty").mkdir()
    args = make_args(checkpoint, folders, tmp_path) + ["--out", str(tmp_path / "o"), "--quiet"]
    if "--model" not in args:
        args += OVERRIDES
    code = ev.main(args)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o"), "nothing is written before the inputs are known to be good"


def test_non_synset_subfolders_are_rejected(tmp_path, checkpoint, capsys):
    (tmp_path / "cats").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cats" / "a.jpg")
    assert ev.main(["--checkpoint", checkpoint, "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet", *OVERRIDES]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cats" in err[0] and "n01440764" in err[0], err
