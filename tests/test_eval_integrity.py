"""Faults of the disk and damaged or changed inputs of a resumed eval (issue 27, items 3 and 4): each is one
line and a non-zero exit, or a resume that recomputes what was lost; never a traceback, never nulls written
over good result files, never old and new images mixed in one result.

disk          free space too small for the run (refused before any write), a file-size limit below the
              run's files (refused), ENOSPC while the predictions are created (one line; the rerun
              finishes), ENOSPC on a progress save mid-run (the rerun resumes), EFBIG while the results
              are written (one line; the rerun writes them)
predictions   a deleted per-configuration file, a deleted folder, a 0-byte file, a count whose predictions
              vanished before the end (refused, result files kept)
content       an image folder whose images changed under the same names, sizes and labels; an embedded
              testbed whose test split changed
"""

import errno
import json
import os
import resource

import numpy as np
import pytest
from PIL import Image

from stm_fast import digits
from stm_fast.eval import cli, fingerprint
from stm_fast.eval.predictions import PredictionStore
from tests.builders import OVERRIDES, SYNS

DIGITS = ["--methods", "stm", "--rates", "0.2", "--limit", "40", "--batch-size", "20", "--quiet", "--no-self-check"]
SMALL = ["--methods", "stm", "--rates", "0.1", "--batch-size", "4", "--quiet", "--no-self-check", *OVERRIDES]


@pytest.fixture(autouse=True)
def _fixed_code_version(monkeypatch):
    """Other work on the package's sources between two runs of one test must not look like a new code version."""
    monkeypatch.setattr(fingerprint, "code_version", lambda: "test")


def run_cli(args, capsys):
    """(exit code, stderr lines) of the eval command line."""
    code = cli.main(args)
    return code, capsys.readouterr().err.strip().splitlines()


def table(out):
    return open(os.path.join(out, "table.md")).read()


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """The table of an uninterrupted digits run (DIGITS) that nothing went wrong in."""
    out = str(tmp_path_factory.mktemp("fresh") / "run")
    fingerprint.code_version, real = (lambda: "test"), fingerprint.code_version
    try:
        assert cli.main(DIGITS + ["--out", out]) == 0
    finally:
        fingerprint.code_version = real
    return table(out)


def fail_fsync(monkeypatch, code, where):
    """os.fsync raises OSError(code) for files whose path contains ``where`` (as a full disk does at fsync)."""
    real = os.fsync

    def fsync(fd):
        if where in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def leftovers(out):
    return [n for _, _, names in os.walk(out) for n in names if ".tmp" in n]


# ------------------------------------------------------------------------------------------------- disk

def test_too_little_free_space_is_refused_before_the_run_writes(tmp_path, capsys, monkeypatch):
    class Full:
        f_bavail = f_bfree = 3
        f_frsize = 4096

    monkeypatch.setattr(os, "statvfs", lambda path: Full())
    out = tmp_path / "run"
    code, err = run_cli(DIGITS + ["--out", str(out)], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: --out {out}: the run must write at least ")
    assert "but its disk has 0.0 MiB free: free space there, or choose an --out on another disk" in err[0]
    assert not (out / "run.json").exists() and not (out / "predictions").exists()


def test_a_file_size_limit_below_the_runs_files_is_refused_before_the_run_writes(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(resource, "getrlimit", lambda what: (1000, resource.RLIM_INFINITY))
    out = tmp_path / "run"
    code, err = run_cli(DIGITS + ["--out", str(out)], capsys)
    assert code == 2 and len(err) == 1 and "may write files of at most 1000 bytes (ulimit -f)" in err[0]
    assert err[0].endswith("raise the limit (ulimit -f unlimited)") and not (out / "run.json").exists()


def test_a_full_disk_at_start_is_one_line_and_the_rerun_finishes(tmp_path, capsys, monkeypatch, fresh):
    out = str(tmp_path / "run")
    fail_fsync(monkeypatch, errno.ENOSPC, "/predictions/")
    code, err = run_cli(DIGITS + ["--out", out], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"error: no space left on the device writing {out}/predictions/labels.rank0.npy: free space on "
                      f"that disk, then rerun with the same --out to resume (finished batches are kept)")
    assert os.listdir(os.path.join(out, "predictions")) == [] and leftovers(out) == [], "no partial file is left"
    monkeypatch.undo()
    monkeypatch.setattr(fingerprint, "code_version", lambda: "test")
    assert cli.main(DIGITS + ["--out", out]) == 0
    assert table(out) == fresh


def test_a_full_disk_mid_run_is_one_line_and_the_rerun_resumes(tmp_path, capsys, monkeypatch, fresh):
    from stm_fast.eval import progress

    out = str(tmp_path / "run")
    saves = []
    real = progress.Progress.save

    def save(self):  # the first batch is saved, the second meets a full disk
        saves.append(1)
        if len(saves) == 2:
            fail_fsync(monkeypatch, errno.ENOSPC, "progress.rank0.json")
        real(self)

    monkeypatch.setattr(progress.Progress, "save", save)
    code, err = run_cli(DIGITS + ["--out", out], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: no space left on the device writing "
                                                             f"{out}/progress.rank0.json: ")
    assert leftovers(out) == [] and not os.path.exists(os.path.join(out, "results.json"))
    counts = json.load(open(os.path.join(out, "progress.rank0.json")))["counts"]
    assert {c["batches"] for c in counts.values()} == {1}, "the first batch is kept"
    monkeypatch.undo()
    monkeypatch.setattr(fingerprint, "code_version", lambda: "test")
    assert cli.main(DIGITS + ["--out", out]) == 0
    assert table(out) == fresh


@pytest.mark.parametrize("limit, extra, where", [
    (8000, [], "into --out {out}"),  # the first large file: lsq_weights.png (figures.py, through run.py)
    (4000, ["--stm-weights", "avg"], "the result files into {out}"),  # no lsq figure: results.json
])
def test_a_file_size_limit_while_writing_is_one_line_and_the_rerun_finishes(tmp_path, capsys, limit, extra, where):
    """A real EFBIG: the limit lets the run's small files through and stops its first large one."""
    out = str(tmp_path / "run")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        code, err = run_cli(DIGITS + extra + ["--out", out], capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"error: file too large writing {where.format(out=out)}: this process's file-size limit "
                      f"(ulimit -f) or the file system's was reached; raise the limit (ulimit -f unlimited), then "
                      f"rerun with the same --out to resume (finished batches are kept)")
    assert leftovers(out) == [], "no partial temporary file is left"
    assert cli.main(DIGITS + extra + ["--out", out]) == 0
    assert all(r["top1"] is not None for r in json.load(open(os.path.join(out, "results.json"))))


# ------------------------------------------------------------------------------------------ predictions

@pytest.mark.parametrize("damage", ["delete one file", "delete the folder", "empty the labels", "empty one file"])
def test_lost_or_damaged_predictions_are_recomputed(tmp_path, capsys, fresh, damage):
    out = str(tmp_path / "run")
    assert cli.main(DIGITS + ["--out", out]) == 0
    folder = os.path.join(out, "predictions")
    one = sorted(n for n in os.listdir(folder) if not n.startswith(("labels", "digests")))[0]
    if damage == "delete one file":
        os.remove(os.path.join(folder, one))
    elif damage == "delete the folder":
        import shutil

        shutil.rmtree(folder)
    else:
        open(os.path.join(folder, "labels.rank0.npy" if damage == "empty the labels" else one), "w").close()
    os.remove(os.path.join(out, "table.md"))
    code, err = run_cli(DIGITS + ["--out", out], capsys)
    assert code == 0 and len(err) == 1 and err[0].startswith("note: the predictions of ")
    assert err[0].endswith(f"are missing or damaged in {folder}: recomputing them")
    assert ("of 6 configuration(s)" in err[0]) == (damage in ("delete the folder", "empty the labels"))
    assert table(out) == fresh, "the same numbers as a run that lost nothing"


def test_a_zero_byte_file_left_by_a_full_disk_resumes(tmp_path, fresh):
    """What a full disk left before the writes were atomic: a 0-byte array that no count refers to."""
    out = str(tmp_path / "run")
    os.makedirs(os.path.join(out, "predictions"))
    open(os.path.join(out, "predictions", "labels.rank0.npy"), "w").close()
    assert cli.main(DIGITS + ["--out", out]) == 0
    assert table(out) == fresh


def test_predictions_lost_before_the_end_are_refused_and_the_result_files_kept(tmp_path, capsys, monkeypatch, fresh):
    out = str(tmp_path / "run")
    assert cli.main(DIGITS + ["--out", out]) == 0
    before = {n: open(os.path.join(out, n), "rb").read() for n in ("results.json", "results.csv", "table.md")}
    real = PredictionStore.gather

    def gather(self, keys, world):  # a file lost while the run went on: one configuration's predictions are gone
        labels, preds, fine = real(self, keys, world)
        preds[keys[-1]] = np.full_like(preds[keys[-1]], -1)
        return labels, preds, fine

    monkeypatch.setattr(PredictionStore, "gather", gather)
    code, err = run_cli(DIGITS + ["--out", out], capsys)
    assert code == 2 and len(err) == 1 and "do not hold the images counted" in err[0]
    assert "nothing was written; rerun with the same --out to recompute them" in err[0]
    assert {n: open(os.path.join(out, n), "rb").read() for n in before} == before, "no nulls over good files"


# -------------------------------------------------------------------------------------------- content

def ppm_folder(root, values):
    """An ImageFolder of uncompressed PPM images (their size depends only on their shape), one per value."""
    for i, v in enumerate(values):
        folder = root / SYNS[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((36, 36, 3), v, np.uint8)).save(folder / f"img{i}.ppm")
    return str(root)


def test_changed_images_under_the_same_names_sizes_and_labels_are_refused(tmp_path, checkpoint, capsys):
    data = ppm_folder(tmp_path / "val", [10, 60, 110, 160, 210, 250])
    base = ["--checkpoint", checkpoint, "--data", data, "--out", str(tmp_path / "run"), *SMALL]
    assert cli.main(base) == 0
    before = open(tmp_path / "run" / "results.json").read()
    changed = tmp_path / "val" / SYNS[1] / "img5.ppm"
    size = changed.stat().st_size
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(changed)
    assert changed.stat().st_size == size, "same name, size and label"
    for extra in ([], ["--methods", "stm", "tome"]):  # a finished run, and one that adds a configuration
        code, err = run_cli(base + extra, capsys)
        assert code == 2 and len(err) == 1, err
        assert err[0] == (f"error: {changed} changed since its predictions in {tmp_path}/run/predictions were made "
                          f"(same name, size and label, other content; 1 image(s) of this batch): its old and new "
                          f"numbers cannot be mixed; pass --restart to discard the old ones, or choose another --out")
    assert open(tmp_path / "run" / "results.json").read() == before
    assert cli.main(base + ["--restart"]) == 0


def test_a_changed_test_split_of_an_embedded_testbed_is_refused(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    assert cli.main(DIGITS + ["--out", out]) == 0
    real = digits.load_test_split

    def changed(name):
        x, y = real(name)
        x = x.clone()
        x[3] = -x[3]
        return x, y

    monkeypatch.setattr(digits, "load_test_split", changed)
    code, err = run_cli(DIGITS + ["--out", out], capsys)
    assert code == 2 and len(err) == 1
    assert "holds a run of other inputs (the test split's image content changed)" in err[0] and "--restart" in err[0]
