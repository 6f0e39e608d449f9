"""Distributed eval runs on the CPU (gloo), as torchrun and hand-made launches start them: every rank takes
part in the same collectives whatever its images (a rank with no image, or none readable, is normal), one
rank's refusal stops every rank with one line from rank 0 and the same exit code, and a launch that cannot
form a process group is one line before anything waits long.

The subprocesses run with STM_SCAN_BACKEND=torch: the fused CPU kernel would otherwise be compiled on first
use (half a minute), which says nothing about distribution.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from stm_fast.eval import cli
from tests.builders import OVERRIDES, SYNS

QUICK = ["--methods", "stm", "--rates", "0.2", "--quiet"]
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "STM_DIST_TIMEOUT")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("TORCHELASTIC")}
    env.update({"OMP_NUM_THREADS": "1", "STM_SCAN_BACKEND": "torch", "STM_DIST_BACKEND": "gloo", **extra})
    return env


def torchrun(args, tmp_path, timeout=60):
    """(torchrun's exit code and stderr, {rank: (stdout, stderr)}) of a 2-process eval; each rank's streams go
    to its own log file, so what each rank printed can be told apart. A run past ``timeout`` fails the test;
    torchrun is then asked to end its workers (it starts each in a session of its own)."""
    logs = tmp_path / "logs"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "--log-dir", str(logs), "--redirects", "3", "-m", "stm_fast.eval", *args],
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        pytest.fail(f"torchrun {' '.join(args)} did not end within {timeout} s")
    streams = {}
    for rank in (0, 1):
        [folder] = logs.glob(f"*/attempt_0/{rank}")
        streams[rank] = ((folder / "stdout.log").read_text(), (folder / "stderr.log").read_text())
    return proc.returncode, err, streams


def launch(args, rank_env=({}, {}), launcher=None, timeout=60):
    """[(exit code, stdout, stderr)] of two eval processes started by hand with the variables torchrun sets
    (rank 0 hosts the rendezvous): each rank's own exit code, which torchrun does not return."""
    port = str(free_port())
    entry = [str(launcher)] if launcher else ["-m", "stm_fast.eval"]
    procs = [subprocess.Popen([sys.executable, *entry, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=clean_env(WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                            MASTER_PORT=port, **rank_env[r]))
             for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, *out) for p, out in zip(procs, outs)]


def cells(out):
    """Every number of every record but the timings (a rank that scored nothing adds exact zeros)."""
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "self_check")}
            for r in json.load(open(os.path.join(out, "results.json")))]


# --------------------------------------------------------------------------- ranks without work

@pytest.mark.slow
def test_two_ranks_one_image_finish_with_the_single_process_numbers(tmp_path, monkeypatch):
    """Rank 1 has no image at all: it still takes part in every collective with the same shapes."""
    monkeypatch.setenv("STM_SCAN_BACKEND", "torch")
    args = ["--limit", "1", *QUICK]
    assert cli.main(args + ["--out", str(tmp_path / "one")]) == 0
    code, err, streams = torchrun(args + ["--out", str(tmp_path / "two")], tmp_path)
    assert code == 0, err[-3000:] + streams[0][1] + streams[1][1]
    assert cells(tmp_path / "two") == cells(tmp_path / "one")
    assert {c["images"] for c in cells(tmp_path / "two")} == {1} and cells(tmp_path / "two")[0]["cls_deviation"]


@pytest.mark.slow
def test_a_rank_whose_images_are_all_unreadable_is_normal(tmp_path, checkpoint):
    folder = tmp_path / "val" / SYNS[0]
    folder.mkdir(parents=True)
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(folder / "a.JPEG", format="JPEG")  # rank 0's
    (folder / "b.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")  # rank 1's
    out = str(tmp_path / "run")
    results = launch(["--checkpoint", checkpoint, "--data", str(tmp_path / "val"), "--out", out, "--workers", "0",
                      *QUICK, *OVERRIDES])
    assert [r[0] for r in results] == [0, 0], results
    assert results[1][2] == "" and "error" not in results[0][2] and "Traceback" not in results[0][2], results
    records = json.load(open(os.path.join(out, "results.json")))
    assert {(r["images"], r["bad_images"]) for r in records} == {(1, 1)}


@pytest.mark.slow
def test_no_readable_image_on_any_rank_exits_3_on_every_rank_with_one_line(tmp_path, checkpoint):
    folder = tmp_path / "val" / SYNS[0]
    folder.mkdir(parents=True)
    for name in ("a.JPEG", "b.JPEG"):
        (folder / name).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    results = launch(["--checkpoint", checkpoint, "--data", str(tmp_path / "val"), "--out", str(tmp_path / "run"),
                      "--workers", "0", *QUICK, *OVERRIDES])
    assert [r[0] for r in results] == [3, 3], results
    assert results[0][2].startswith("error: no image of 2 cell(s) could be read") and len(results[0][2].splitlines()) == 1
    assert results[1][2] == ""


# --------------------------------------------------------------------------- refusals

@pytest.mark.slow
def test_a_refusal_on_every_rank_is_one_line_from_rank_0_under_torchrun(tmp_path):
    (tmp_path / "afile").write_text("x")
    code, err, streams = torchrun(["--limit", "1", *QUICK, "--out", str(tmp_path / "afile")], tmp_path)
    assert code != 0
    assert streams[0][1].splitlines() == [f"error: --out {tmp_path / 'afile'} is a file, not a folder: choose a folder "
                                          f"for the results"]
    assert streams[1] == ("", ""), "rank 1 prints nothing"
    assert "exitcode  : 2" in err and "exitcode  : 1" not in err


@pytest.mark.slow
def test_a_model_refused_on_every_rank_exits_2_everywhere_with_one_line(tmp_path, checkpoint, folders):
    results = launch(["--checkpoint", checkpoint, "--data", folders[0], "--out", str(tmp_path / "o"), *QUICK, *OVERRIDES,
                      "--override", "patch_size=40"])
    assert [r[0] for r in results] == [2, 2], results
    assert len(results[0][2].splitlines()) == 1 and "img_size 32 is smaller than patch_size 40" in results[0][2]
    assert results[1][1:] == ("", "")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_refusal_on_rank_1_alone_stops_rank_0_too(tmp_path):
    results = launch(["--limit", "1", *QUICK, "--out", str(tmp_path / "o")],
                     rank_env=({}, {"STM_SCAN_BACKEND": "cuda_magic"}))
    assert [r[0] for r in results] == [2, 2], results
    assert results[0][2].splitlines() == ["error: rank 1: STM_SCAN_BACKEND='cuda_magic' is not a scan backend: set one "
                                          "of mamba_ssm, triton, fused, torch, loop, or unset it for the automatic choice"]
    assert results[1][2] == ""
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_failure_mid_run_on_rank_1_stops_rank_0_within_a_batch(tmp_path, checkpoint, folders):
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import os, sys\nimport stm_fast\nfrom stm_fast.eval.cli import main\n"
        "real = stm_fast.vim.VisionMamba.forward\n"
        "def poisoned(self, x, observer=None):\n"
        "    y = real(self, x, observer)\n"
        "    return y * float('nan') if self.reduction is not None else y\n"
        "if os.environ['RANK'] == '1':\n"
        "    stm_fast.vim.VisionMamba.forward = poisoned\n"
        "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "o"
    results = launch(["--checkpoint", checkpoint, "--data", folders[0], "--out", str(out), "--batch-size", "2",
                      "--workers", "0", *QUICK, *OVERRIDES], launcher=launcher)
    assert [r[0] for r in results] == [2, 2], results
    assert results[0][2].splitlines() == [
        "error: rank 1: non-finite logits (NaN or inf) in batch 0 of vim_tiny, stm at --rates 0.2: the numbers would "
        "mean nothing, so the run stops (finished batches are saved); check the checkpoint and --dtype (fp32 is the "
        "safest)"]
    assert results[1][2] == ""
    done = json.load(open(out / "progress.rank0.json"))["counts"]
    assert {c["batches"] for c in done.values()} == {1}, "rank 0 stopped after the batch in which rank 1 failed"


# --------------------------------------------------------------------------- launches that cannot form a group

def run_cli(args, capfd):
    """(exit code, stderr lines) of the eval command line, C++ output on the file descriptors included."""
    code = cli.main(args)
    return code, capfd.readouterr().err.strip().splitlines()


@pytest.fixture
def no_work(monkeypatch):
    """The eval fails the test if it starts loading models: a launch refusal comes before any work."""
    from stm_fast.eval import run

    def refuse(*args, **kwargs):
        raise AssertionError("models were loaded")

    monkeypatch.setattr(run, "load_models", refuse)
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT are not, so this process was not "
                          "started by torchrun: launch with torchrun --nproc_per_node 2 -m stm_fast.eval ..., or unset "
                          "WORLD_SIZE to run as one process"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT is not, so this process"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     "LOCAL_RANK=1, RANK=0 and WORLD_SIZE=2 contradict each other"),
    ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     "LOCAL_WORLD_SIZE=8, RANK=3 and WORLD_SIZE=4 contradict each other"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "STM_DIST_TIMEOUT": "soon"},
     "STM_DIST_TIMEOUT='soon' is not a positive number of seconds"),
])
def test_a_launch_torchrun_did_not_make_is_one_line_before_any_work(tmp_path, capfd, monkeypatch, no_work, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code, err = run_cli(["--quiet", "--out", str(tmp_path / "o")], capfd)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_a_stale_torchrun_environment_is_one_line_at_once(tmp_path, capfd, monkeypatch, no_work):
    """torchrun's variables left in a shell: its store no longer answers, where waiting would hang."""
    port = free_port()
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                 "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "none"}.items():
        monkeypatch.setenv(k, v)
    code, err = run_cli(["--quiet", "--out", str(tmp_path / "o")], capfd)
    assert code == 2 and len(err) == 1, err
    assert f"no torchrun answers at MASTER_ADDR:MASTER_PORT=127.0.0.1:{port}" in err[0]
    assert "left over from an earlier torchrun" in err[0] and "TORCHELASTIC_*" in err[0]


@pytest.mark.parametrize("rank", ["0", "1"], ids=["hosting", "joining"])
def test_ranks_that_never_arrive_are_one_line_after_the_timeout(tmp_path, rank):
    """The other rank is never started: rank 0 waits for it as the host, rank 1 for a host; each gives up
    after STM_DIST_TIMEOUT seconds with one line (torch's own retries print nothing)."""
    proc = subprocess.run([sys.executable, "-m", "stm_fast.eval", "--limit", "1", *QUICK, "--out", str(tmp_path / "o")],
                          env=clean_env(WORLD_SIZE="2", RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                                        STM_DIST_TIMEOUT="1"),
                          capture_output=True, text=True, timeout=60)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-3000:]
    assert f"error: rank {rank} of 2 could not form the process group at 127.0.0.1:" in err[0]
    assert "within 1 s" in err[0] and "STM_DIST_TIMEOUT=SECONDS waits longer" in err[0]
