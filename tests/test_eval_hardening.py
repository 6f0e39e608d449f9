"""Hostile and broken inputs, one case each: every result is tied to what produced it, every bad input is a
one-line error (a non-zero exit, nothing written), nothing hangs. The matrix, by group:

results tied to inputs   changed checkpoint, added or removed images, other precision, batch size, scan
                         backend or label file on resume, other --methods into a finished folder,
                         a cell without a readable image, non-finite weights and logits
labels                   conflicting duplicates, labels outside the model's classes, names that differ only
                         by extension, BOM / Latin-1 CSVs, rows without a label, non-integer labels,
                         ground-truth ids outside 1..1000, a --devkit that is not a devkit
images                   16-bit and float greyscale, a FIFO in the folder
options                  --limit/--batch-size/--workers/--schedule/--override/--device/WORLD_SIZE/RANK,
                         reduce() arguments of the wrong type, an empty batch
output folder            a file, inside a file, not writable, corrupt run.json/progress files, two runs at
                         once, --restart; an infeasible rate or schedule on the command line
messages                 code in a checkpoint, EMA-only checkpoints, --labels with an ImageFolder, bench and
                         train_tiny options
"""

import fcntl
import json
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import stm_fast
from stm_fast import bench, train_tiny
from stm_fast.reduction import METHODS
from stm_fast.eval import cli
from stm_fast.eval.imagenet import to_rgb
from tests.builders import OVERRIDES, SYNS

QUICK = ["--methods", "stm", "--rates", "0.1", "--quiet", "--batch-size", "4", *OVERRIDES]


def run_cli(args, capsys):
    """(exit code, the last stderr line, number of stderr lines) of the eval command line."""
    code = cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, (err[-1] if err else ""), len(err)


def records(out):
    return json.load(open(os.path.join(out, "results.json")))


def flat_folder(tmp_path, rows, names=("a.JPEG", "b.JPEG"), header="filename,label", encoding="utf-8", bom=b""):
    folder = tmp_path / "flat"
    folder.mkdir()
    for n in names:
        Image.fromarray(np.full((40, 40, 3), 100, np.uint8)).save(folder / n, format="JPEG")
    (tmp_path / "labels.csv").write_bytes(bom + "\n".join([header, *rows]).encode(encoding))
    return str(folder), str(tmp_path / "labels.csv")


# ------------------------------------------------------------------------------ results tied to inputs

def test_a_replaced_checkpoint_is_not_resumed_into_old_numbers(tmp_path, checkpoint, folders, capsys):
    out = str(tmp_path / "run")
    assert cli.main(["--checkpoint", checkpoint, "--data", folders[0], "--out", out, *QUICK]) == 0
    other = tmp_path / "other.pth"
    sd = torch.load(checkpoint, weights_only=False)
    sd["model"]["head.bias"] += 1.0
    torch.save(sd, other)
    code, err, n = run_cli(["--checkpoint", str(other), "--data", folders[0], "--out", out, *QUICK], capsys)
    assert code == 2 and n == 1
    assert "holds a run of other inputs (the checkpoint file's content changed)" in err and "--restart" in err
    assert cli.main(["--checkpoint", str(other), "--data", folders[0], "--out", out, "--restart", *QUICK]) == 0


def test_added_images_are_not_resumed_into_old_numbers(tmp_path, checkpoint, folders, capsys):
    import shutil

    tree = tmp_path / "val"
    shutil.copytree(folders[0], tree)
    out = str(tmp_path / "run")
    assert cli.main(["--checkpoint", checkpoint, "--data", str(tree), "--out", out, *QUICK]) == 0
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tree / SYNS[1] / "new.JPEG")
    code, err, _ = run_cli(["--checkpoint", checkpoint, "--data", str(tree), "--out", out, *QUICK], capsys)
    assert code == 2 and "the image list (names, sizes or labels) changed" in err


def test_removed_images_are_not_resumed_into_old_numbers(tmp_path, checkpoint, folders, capsys):
    import shutil

    tree = tmp_path / "val"
    shutil.copytree(folders[0], tree)
    out = str(tmp_path / "run")
    assert cli.main(["--checkpoint", checkpoint, "--data", str(tree), "--out", out, *QUICK]) == 0
    before = open(os.path.join(out, "results.json")).read()
    os.remove(sorted((tree / SYNS[0]).iterdir())[0])
    code, err, n = run_cli(["--checkpoint", checkpoint, "--data", str(tree), "--out", out, *QUICK], capsys)
    assert code == 2 and n == 1 and "the image list (names, sizes or labels) changed" in err
    assert open(os.path.join(out, "results.json")).read() == before, "the old results are kept as they were"


@pytest.mark.parametrize("change, extra, env, named", [
    ("precision", ["--dtype", "bf16"], {}, "dtype ('fp32' -> 'bf16')"),
    ("batch size", ["--batch-size", "2"], {}, "batch_size (4 -> 2)"),
    ("scan backend", [], {"STM_SCAN_BACKEND": "torch"}, "the scan backend"),
    ("label file", None, {}, "the label file"),
])
def test_other_settings_are_not_resumed_into_old_numbers(tmp_path, checkpoint, capsys, monkeypatch, change, extra,
                                                         env, named):
    """A rerun into the same --out whose precision, batch size, scan backend or label file differs is refused,
    naming what changed (the backend case needs a machine where the automatic choice is not torch)."""
    if change == "scan backend" and stm_fast.ssm.resolve_backend(None, "cpu") == "torch":
        pytest.skip("the automatic CPU backend is torch here: forcing torch changes nothing")
    folder, labels = flat_folder(tmp_path, ["a.JPEG,0", "b.JPEG,1"])
    base = ["--checkpoint", checkpoint, "--data", folder, "--labels", labels, "--out", str(tmp_path / "run"), *QUICK]
    assert cli.main(base) == 0
    if extra is None:  # the same labels with a trailing empty line: another file, the same meaning
        (tmp_path / "labels.csv").write_text("filename,label\na.JPEG,0\nb.JPEG,1\n\n")
        extra = []
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code, err, n = run_cli(base + extra, capsys)
    assert code == 2 and n == 1 and named in err and "--restart" in err, err


def test_other_methods_into_a_finished_folder_are_merged_not_dropped(tmp_path, checkpoint, folders):
    out = str(tmp_path / "run")
    base = ["--checkpoint", checkpoint, "--data", folders[0], "--out", out, "--quiet", "--batch-size", "4", *OVERRIDES]
    assert cli.main(base + ["--methods", "stm", "--rates", "0.1"]) == 0
    first = {(r["method"], r["rate"]): r["top1"] for r in records(out)}
    assert cli.main(base + ["--methods", "tome", "--rates", "0.1"]) == 0
    both = {(r["method"], r["rate"]): r["top1"] for r in records(out)}
    assert set(both) == {("none", 0.0), ("stm", 0.1), ("tome", 0.1)}
    assert all(both[k] == v for k, v in first.items()), "finished rows are kept as they were"
    table = open(os.path.join(out, "table.md")).read()
    assert "tome |" in table and "stm (both sides, lsq weights)" in table


def test_a_cell_without_readable_images_is_null_and_fails_the_run(tmp_path, checkpoint, capsys):
    tree = tmp_path / "val" / SYNS[0]
    tree.mkdir(parents=True)
    for i in range(3):
        (tree / f"bad{i}.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    out = str(tmp_path / "run")
    code, err, _ = run_cli(["--checkpoint", checkpoint, "--data", str(tmp_path / "val"), "--out", out, *QUICK], capsys)
    assert code == 3 and "no image of 2 cell(s) could be read" in err
    assert all(r["top1"] is None and r["images"] == 0 for r in records(out))
    assert "| baseline (no reduction) | 0% | 0.0 | n/a | — | n/a |" in open(os.path.join(out, "table.md")).read()


def test_non_finite_weights_are_refused_at_load(tmp_path, checkpoint, folders, capsys):
    sd = torch.load(checkpoint, weights_only=False)
    sd["model"]["layers.0.mixer.D"][3] = float("nan")
    bad = tmp_path / "nan.pth"
    torch.save(sd, bad)
    code, err, n = run_cli(["--checkpoint", str(bad), "--data", folders[0], "--out", str(tmp_path / "o"), *QUICK], capsys)
    assert code == 2 and n == 1 and "1 tensor(s) hold NaN or inf (layers.0.mixer.D)" in err
    assert not (tmp_path / "o").exists()


def test_non_finite_logits_stop_the_run_naming_batch_and_configuration(tmp_path, checkpoint, folders, capsys, monkeypatch):
    real = stm_fast.vim.VisionMamba.forward

    def poisoned(self, x, observer=None):
        y = real(self, x, observer)
        return y * float("nan") if self.reduction is not None else y

    monkeypatch.setattr(stm_fast.vim.VisionMamba, "forward", poisoned)
    code, err, _ = run_cli(["--checkpoint", checkpoint, "--data", folders[0], "--out", str(tmp_path / "o"), *QUICK], capsys)
    assert code == 2 and "non-finite logits (NaN or inf) in batch 0 of vim_tiny, stm at --rates 0.1" in err


# ------------------------------------------------------------------------------------------- labels

@pytest.mark.parametrize("rows,names,message", [
    (["a.JPEG,n01440764", "b.JPEG,1", "a.JPEG,2"], ("a.JPEG", "b.JPEG"), "lines 2 and 4 give a two labels"),
    (["a.JPEG,n01440764", "b.JPEG"], ("a.JPEG", "b.JPEG"), "line 3: no label in the row"),
    (["a.JPEG,n01440764", "b.JPEG,seven"], ("a.JPEG", "b.JPEG"), "line 3: label 'seven' is neither a synset id"),
    (["a.JPEG,0", "a.png,1"], ("a.JPEG", "a.png"), "a.JPEG and a.png differ only by extension"),
])
def test_bad_label_rows_are_named(tmp_path, checkpoint, capsys, rows, names, message):
    folder, labels = flat_folder(tmp_path, rows, names)
    code, err, n = run_cli(["--checkpoint", checkpoint, "--data", folder, "--labels", labels,
                            "--out", str(tmp_path / "o"), *QUICK], capsys)
    assert code == 2 and n == 1 and message in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("encoding,bom", [("utf-8", b"\xef\xbb\xbf"), ("utf-16-le", b"\xff\xfe"), ("cp1252", b"")])
def test_csv_with_a_byte_order_mark_or_latin1_is_read(tmp_path, checkpoint, encoding, bom):
    folder, labels = flat_folder(tmp_path, ["a.JPEG,0", "b.JPEG,n01443537"], header="filename,label", encoding=encoding,
                                 bom=bom)
    if encoding == "cp1252":  # a Latin-1 comment column does not break the file
        text = open(labels, encoding="cp1252").read().replace("filename,label", "filename,label,note")
        text = text.replace("a.JPEG,0", "a.JPEG,0,caf\xe9")
        open(labels, "w", encoding="cp1252").write(text)
    out = str(tmp_path / "o")
    assert cli.main(["--checkpoint", checkpoint, "--data", folder, "--labels", labels, "--out", out, *QUICK]) == 0
    assert records(out)[0]["images"] == 2


def test_labels_outside_the_models_classes_are_an_error(tmp_path, checkpoint, capsys):
    folder, labels = flat_folder(tmp_path, ["a.JPEG,0", "b.JPEG,999"])
    code, err, _ = run_cli(["--checkpoint", checkpoint, "--data", folder, "--labels", labels, "--out", str(tmp_path / "o"),
                            *QUICK, "--override", "num_classes=10"], capsys)
    assert code == 2  # the 10-class model cannot even load the 1000-class file ...
    ten = tmp_path / "ten.pth"
    torch.manual_seed(0)
    torch.save({"model": stm_fast.create_model("vim_tiny", **{**dict(img_size=32, patch_size=4, embed_dim=16, depth=4,
                                                                        d_state=8), "num_classes": 10}).state_dict()}, ten)
    code, err, _ = run_cli(["--checkpoint", str(ten), "--data", folder, "--labels", labels, "--out", str(tmp_path / "o"),
                            *QUICK, "--override", "num_classes=10"], capsys)
    assert code == 2 and "1 image(s) have a label outside the model's 10 classes" in err and "b.JPEG: class 999" in err


def test_ground_truth_ids_outside_1_to_1000_and_a_fake_devkit_are_errors(tmp_path, checkpoint, capsys):
    folder, _ = flat_folder(tmp_path, [], names=("ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"))
    gt = tmp_path / "gt.txt"
    gt.write_text("1\n1001\n")
    fake = tmp_path / "devkit" / "data"
    fake.mkdir(parents=True)
    (fake / "meta.mat").write_bytes(b"MATLAB? no, just bytes")
    code, err, _ = run_cli(["--checkpoint", checkpoint, "--data", folder, "--labels", str(gt), "--devkit",
                            str(tmp_path / "devkit"), "--out", str(tmp_path / "o"), *QUICK], capsys)
    assert code == 2 and "is not the ILSVRC2012 devkit's meta.mat" in err
    from scipy.io import savemat

    synsets = np.zeros(1000, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
    for i, w in enumerate(stm_fast.eval.imagenet.SYNSETS):
        synsets[i] = (i + 1, w)
    savemat(fake / "meta.mat", {"synsets": synsets})
    code, err, _ = run_cli(["--checkpoint", checkpoint, "--data", folder, "--labels", str(gt), "--devkit",
                            str(tmp_path / "devkit"), "--out", str(tmp_path / "o"), *QUICK], capsys)
    assert code == 2 and "line 2 holds '1001', not an ILSVRC2012_ID in 1..1000" in err


# ------------------------------------------------------------------------------------------- images

def test_16_bit_and_float_greyscale_are_scaled_not_clipped():
    grey = np.array([[0, 100, 255], [30, 60, 90]], np.uint8)
    want = np.asarray(Image.fromarray(grey, "L").convert("RGB"))
    sixteen = Image.fromarray(grey.astype(np.uint16) * 257)  # what a 16-bit greyscale PNG decodes to
    assert sixteen.mode == "I;16"
    assert np.array_equal(np.asarray(to_rgb(sixteen)), want)
    assert np.array_equal(np.asarray(to_rgb(sixteen.convert("I"))), want)
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(grey.astype(np.float32) / 255))), want)
    clipped = np.asarray(sixteen.convert("RGB"))
    assert not np.array_equal(clipped, want), "PIL's own conversion would clip: the test must be able to fail"
    with pytest.raises(ValueError, match="no known scale"):
        to_rgb(Image.fromarray(np.full((2, 2), 1000.0, np.float32)))


def test_a_fifo_in_the_image_folder_is_skipped_and_listed_not_opened(tmp_path, checkpoint, folders):
    import shutil

    tree = tmp_path / "val"
    shutil.copytree(folders[0], tree)
    os.mkfifo(tree / SYNS[0] / "pipe.JPEG")  # opening it would block forever
    out = str(tmp_path / "o")
    done = []
    t = threading.Thread(target=lambda: done.append(cli.main(["--checkpoint", checkpoint, "--data", str(tree), "--out",
                                                              out, *QUICK])), daemon=True)
    t.start()
    t.join(120)
    assert done == [0], "the run finished"
    rec = records(out)[0]
    assert rec["skipped_files"] == 1 and rec["skipped_file_list"][0].endswith("pipe.JPEG: not a regular file (a FIFO, "
                                                                             "socket or device); not opened")


# ------------------------------------------------------------------------------------------ options

@pytest.mark.parametrize("args,message", [
    (["--limit", "0"], "argument --limit: expected a positive integer, got 0"),
    (["--limit", "-3"], "argument --limit: expected a positive integer, got -3"),
    (["--batch-size", "0"], "argument --batch-size: expected a positive integer, got 0"),
    (["--batch-size", "-8"], "argument --batch-size: expected a positive integer, got -8"),
    (["--workers", "-1"], "argument --workers: expected a non-negative integer, got -1"),
    (["--schedule", ""], "--schedule takes non-negative integers separated by commas"),
    (["--schedule", "4,,2"], "--schedule takes non-negative integers separated by commas"),
    (["--schedule", "-1"], "--schedule takes non-negative integers separated by commas"),
    (["--rates", "nan"], "--rates must be in [0, 1)"),
])
def test_meaningless_options_are_errors_before_any_work(tmp_path, capsys, args, message):
    """argparse's own checks exit with its code 2 (SystemExit); the later ones return 2: both one line."""
    out = tmp_path / "o"
    try:
        code = cli.main(args + ["--quiet", "--out", str(out)])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and not out.exists()
    assert sum(1 for line in err.splitlines() if "error: " in line) == 1


@pytest.mark.parametrize("override,message", [
    ("colour=3", "unknown key 'colour'"), ("depth=0", "depth must be a positive integer"),
    ("stride=0", "stride must be a positive integer"), ("patch_size=40", "img_size 32 is smaller than patch_size 40"),
])
def test_bad_overrides_are_one_line_errors(tmp_path, checkpoint, folders, capsys, override, message):
    code, err, n = run_cli(["--checkpoint", checkpoint, "--data", folders[0], "--out", str(tmp_path / "o"), *QUICK,
                            "--override", override], capsys)
    assert code == 2 and n == 1 and message in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("device,message", [
    ("foo", "--device 'foo' is not a device name"), ("cuda", "--device cuda: this machine has no usable CUDA device"),
    ("cuda:3", "--device cuda:3:"),
])
def test_a_device_that_is_not_here_is_a_one_line_error(tmp_path, capsys, device, message):
    if device.startswith("cuda") and torch.cuda.is_available() and device == "cuda":
        pytest.skip("this machine has CUDA")
    code, err, n = run_cli(["--device", device, "--quiet", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and n == 1 and message in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("env,message", [({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
                                         ({"WORLD_SIZE": "1", "RANK": "x"}, "RANK='x' is not an integer"),
                                         ({"WORLD_SIZE": "2", "RANK": "5"}, "do not describe a process group")])
def test_distributed_environment_that_is_not_integers_is_an_error(tmp_path, capsys, monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code, err, n = run_cli(["--quiet", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and n == 1 and message in err


@pytest.mark.parametrize("kwargs,message", [
    (dict(schedule=2.0), "schedule must be an integer or a sequence of integers"),
    (dict(schedule=[float("inf")]), "schedule entries must be integers (tokens), got inf"),
    (dict(schedule=[]), "the schedule is empty"),
    (dict(rate="0.2"), "rate must be in [0, 1)"), (dict(rate=True), "rate must be in [0, 1)"),
    (dict(rate=0.2, start_layer=1.5), "start_layer must be an integer in 0..2"),
    (dict(rate=0.2, start_layer=True), "start_layer must be an integer in 0..2"),
])
def test_reduce_arguments_of_the_wrong_type_are_clear_errors(kwargs, message):
    m = stm_fast.create_model("vim_tiny", img_size=16, patch_size=4, embed_dim=8, depth=4, d_state=4)
    with pytest.raises(ValueError) as ei:
        stm_fast.reduce(m, "stm", **kwargs)
    assert message in str(ei.value)


def test_reduce_option_types_and_numpy_integers():
    m = stm_fast.create_model("vim_tiny", img_size=16, patch_size=4, embed_dim=8, depth=4, d_state=4)
    with pytest.raises(ValueError, match="align must be True or False, got 'no'"):
        stm_fast.reduce(m, "top", rate=0.2, align="no")
    with pytest.raises(ValueError, match=r"layers must be integers \(layer indices\), got 1.5"):
        stm_fast.reduce(m, "top", rate=0.2, layers=[1.5])
    assert stm_fast.make_reduction(m, "stm", schedule=np.int64(2)).schedule == (2, 2, 2), "numpy integers are integers"


@pytest.mark.parametrize("method", list(METHODS))
def test_a_reduced_model_given_an_empty_batch_returns_an_empty_result(method):
    m = stm_fast.create_model("vim_tiny", img_size=16, patch_size=4, embed_dim=8, depth=4, d_state=4, num_classes=5)
    stm_fast.reduce(m, method, schedule=stm_fast.reduction.method_class(method)(m.cfg).example_schedule())
    with torch.no_grad():
        assert m(torch.empty(0, 3, 16, 16)).shape == (0, 5)


# ------------------------------------------------------------------------------------ output folder

def test_out_that_is_a_file_or_inside_one_is_an_error(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    for out, message in ((f, "is a file, not a folder"), (f / "sub", f"lies inside the file {f}")):
        code, err, n = run_cli(["--quiet", "--out", str(out)], capsys)
        assert code == 2 and n == 1 and message in err
    assert f.read_text() == "x"


def test_out_that_is_not_writable_is_an_error_before_any_work(tmp_path, capsys, monkeypatch):
    """(os.access is patched: this suite may run as root, for whom permission bits do not refuse writes.)"""
    from stm_fast.eval import progress

    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(progress.os, "access", lambda path, mode: os.path.abspath(path) != str(locked))
    code, err, n = run_cli(["--out", str(locked / "run"), "--methods", "stm", "--rates", "0.2", "--quiet"], capsys)
    assert code == 2 and n == 1 and "is not writable by this user" in err and "choose a folder" in err
    assert not (locked / "run").exists()


def test_an_infeasible_rate_or_schedule_on_the_command_line_is_one_full_line(tmp_path, capsys):
    """The whole message (the feasible range and the options that fix it), before any work, nothing written."""
    out = tmp_path / "run"
    code, err, n = run_cli(["--out", str(out), "--methods", "stm", "tome", "--rates", "0.95", "--quiet",
                            "--no-self-check"], capsys)
    assert code == 2 and n == 1 and not out.exists()
    assert "cannot reach a token reduction rate of 95.0%" in err and "feasible rates run from 0 to" in err
    assert err.endswith("(--rates / --methods) or change the STM options")
    code, err, n = run_cli(["--out", str(out), "--methods", "stm", "--schedule", "100", "--quiet", "--no-self-check"],
                           capsys)
    assert code == 2 and n == 1 and not out.exists() and "more than the 62 this model can lose" in err


@pytest.mark.parametrize("name,content,message", [
    ("run.json", "{not json", "run.json is not a readable run record"), ("run.json", "", "is not a readable run record"),
    ("run.json", '{"settings": {}}', "run.json is not a run record of stm_fast.eval"),
    ("progress.rank0.json", "[1, 2]", "progress.rank0.json is not a progress file of stm_fast.eval"),
    ("progress.rank0.json", '{"counts": {"k": {"batches": "many"}}, "bad": {}}', "is not a progress file"),
])
def test_corrupt_or_foreign_files_in_out_are_errors(tmp_path, capsys, name, content, message):
    out = tmp_path / "o"
    out.mkdir()
    (out / name).write_text(content)
    code, err, n = run_cli(["--quiet", "--limit", "20", "--methods", "none", "--out", str(out)], capsys)
    assert code == 2 and n == 1 and message in err and "--restart" in err
    assert cli.main(["--quiet", "--limit", "20", "--methods", "none", "--out", str(out), "--restart"]) == 0


def test_two_runs_into_one_folder_at_once_are_refused(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    with open(out / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another run holds the folder
        code, err, n = run_cli(["--quiet", "--limit", "20", "--methods", "none", "--out", str(out)], capsys)
    assert code == 2 and n == 1 and "another run is writing into --out" in err
    assert not (out / "run.json").exists()


# ------------------------------------------------------------------------------------------ messages

def test_an_ema_only_checkpoint_points_to_ema(tmp_path, checkpoint, folders, capsys):
    sd = torch.load(checkpoint, weights_only=False)
    f = tmp_path / "ema_only.pth"
    torch.save({"model_ema": sd["model"], "epoch": 3}, f)
    code, err, _ = run_cli(["--checkpoint", str(f), "--data", folders[0], "--out", str(tmp_path / "o"), *QUICK], capsys)
    assert code == 2 and "has no 'model' entry (it holds EMA weights only: pass --ema" in err
    assert cli.main(["--checkpoint", str(f), "--ema", "--data", folders[0], "--out", str(tmp_path / "o"), *QUICK]) == 0


def test_labels_with_an_imagefolder_say_the_folders_hold_the_labels(tmp_path, checkpoint, folders, capsys):
    code, err, _ = run_cli(["--checkpoint", checkpoint, "--data", folders[0], "--labels", folders[2],
                            "--out", str(tmp_path / "o"), *QUICK], capsys)
    assert code == 2 and "is an ImageFolder (one sub-folder per synset), which already holds the labels" in err


def test_unsupported_global_says_it_was_not_loaded_and_never_suggests_disabling_the_check(tmp_path, capsys):
    f = tmp_path / "net.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, f)  # a whole module: unpickling needs its class
    code, err, n = run_cli(["--checkpoint", str(f), "--data", str(tmp_path), "--quiet", "--out", str(tmp_path / "o")],
                           capsys)
    assert code == 2 and n == 1 and "references the Python object torch.nn.modules.linear.Linear" in err
    assert "may execute code, so it was not loaded" in err and "weights_only=False" not in err


@pytest.mark.parametrize("args,message", [
    (["--methods", "stmm"], "invalid choice: 'stmm'"), (["--model", "vim_huge"], "invalid choice: 'vim_huge'"),
    (["--rounds", "0"], "--rounds: expected a positive integer, got 0"), (["--json", "."], "is a folder"),
])
def test_bench_options_are_checked_before_the_run(capsys, args, message):
    with pytest.raises(SystemExit) as ei:
        bench.main(args)
    assert ei.value.code == 2 and message in capsys.readouterr().err


def test_train_tiny_never_overwrites_the_shipped_models_by_default(capsys):
    from stm_fast import digits

    with pytest.raises(SystemExit):
        train_tiny.main(["--seed", "0", "--out", digits.checkpoint_path(0)])
    assert "pass --replace-shipped to replace it" in capsys.readouterr().err
    assert train_tiny.build_parser().parse_args(["--seed", "1"]).out is None  # default: ./vim_digits_seed1.pth


# ------------------------------------------------------- environment, output path, overrides (issue 27)

@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if the eval starts loading models: these refusals come before any work."""
    from stm_fast.eval import run

    monkeypatch.setattr(run, "load_models", lambda *a, **k: pytest.fail("models were loaded before the refusal"))


@pytest.mark.parametrize("backend,message", [
    ("cuda_magic", "STM_SCAN_BACKEND='cuda_magic' is not a scan backend: set one of mamba_ssm, triton, fused, torch, "
                   "loop, or unset it for the automatic choice"),
    ("mamba_ssm", "STM_SCAN_BACKEND=mamba_ssm: scan backend 'mamba_ssm' cannot run on cpu: it needs a CUDA device, not "
                  "cpu: unset it for the automatic choice, or set STM_SCAN_BACKEND=torch (it runs everywhere)"),
])
def test_a_scan_backend_that_cannot_run_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, no_loading, backend,
                                                                     message):
    monkeypatch.setenv("STM_SCAN_BACKEND", backend)
    code, err, n = run_cli(["--device", "cpu", "--quiet", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and n == 1 and err == f"error: {message}", err
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_dangling_symbolic_link_is_one_line(tmp_path, capsys, no_loading):
    link, loop = tmp_path / "link", tmp_path / "loop"
    link.symlink_to(tmp_path / "gone")
    loop.symlink_to(loop)
    for out, at, target in ((link, link, tmp_path / "gone"), (link / "run", link, tmp_path / "gone"), (loop, loop, loop)):
        code, err, n = run_cli(["--quiet", "--out", str(out)], capsys)
        assert code == 2 and n == 1, err
        assert f"{at} is a symbolic link to {target}, which does not exist (or is a loop of links): create {target}" in err
    assert not (tmp_path / "gone").exists()


def test_an_override_the_image_transform_cannot_serve_is_one_line(tmp_path, checkpoint, folders, capsys):
    """The transform makes 3-channel RGB images at any img_size: channels is the one override it cannot serve."""
    base = ["--checkpoint", checkpoint, "--data", folders[0], "--out", str(tmp_path / "o"), *QUICK]
    code, err, n = run_cli(base + ["--override", "channels=1"], capsys)
    assert code == 2 and n == 1 and not (tmp_path / "o").exists()
    assert "--override channels=1: the eval feeds RGB images (3 channels" in err and "drop the override" in err
    assert cli.main(base + ["--override", "channels=3"]) == 0


def test_a_baseline_near_chance_or_far_below_the_papers_anchor_is_warned_about():
    """Near chance (<= 2x) on any model, or > 5 points under the paper's ImageNet anchor for an official
    checkpoint on >= 1000 images, gives one warning line per model; a healthy baseline none."""
    import argparse

    from stm_fast.eval.results import baseline_warnings

    rec = dict(method="none", model="vim_tiny", num_classes=1000, images=50000)
    args = argparse.Namespace(model="vim_tiny", checkpoint="vim_t_midclstok_76p1acc.pth")
    assert baseline_warnings([{**rec, "top1": 76.0}], args) == []
    low = baseline_warnings([{**rec, "top1": 60.0}], args)
    assert len(low) == 1 and "the paper reports 76.1%" in low[0] and low[0].startswith("warning: ")
    assert baseline_warnings([{**rec, "top1": 60.0, "images": 500}], args) == [], "too few images to judge"
    testbed = argparse.Namespace(model="vim_tiny", checkpoint=None)
    chance = baseline_warnings([{**rec, "top1": 0.1, "num_classes": 10, "model": "digits-seed0", "images": 360}], testbed)
    assert len(chance) == 1 and "near chance (10.0%)" in chance[0]
    assert baseline_warnings([{**rec, "top1": 0.1, "num_classes": 10, "images": 20}], testbed) == [], "20 images: noise"


def test_files_that_are_not_read_are_named_in_a_note_and_counted(tmp_path, capsys):
    """A .gif among the class folders and a loose image beside them are not images of the run: one note at the
    start names them, and every result record counts them (ignored_files)."""
    import json
    import shutil

    from stm_fast.eval import cli as ev_cli
    from tests.builders import OVERRIDES, image_folders, small_checkpoint

    (tmp_path / "data").mkdir()
    root, _, _ = image_folders(tmp_path / "data")
    cls = next(d for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d)))
    first = next(f for f in sorted(os.listdir(os.path.join(root, cls))) if f.endswith(".JPEG"))
    shutil.copy(os.path.join(root, cls, first), os.path.join(root, cls, "anim.gif"))
    shutil.copy(os.path.join(root, cls, first), os.path.join(root, "loose.JPEG"))
    out = tmp_path / "o"
    code = ev_cli.main(["--model", "vim_tiny", "--checkpoint", small_checkpoint(tmp_path / "c.pth"), "--data", str(root),
                        "--methods", "stm", "--rates", "0.2", "--out", str(out), "--no-self-check"] + OVERRIDES)
    assert code == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "2 file(s) in --data are not read" in notes[0] and "anim.gif" in notes[0]
    assert all(r["ignored_files"] == 2 for r in json.load(open(out / "results.json")))
