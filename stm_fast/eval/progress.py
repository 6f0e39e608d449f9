"""The output folder of an eval run: what it holds, who writes it, and resumable per-rank progress.

``run.json`` records the run's fingerprint (``stm_fast.eval.fingerprint``), the number of processes and
every experiment ever run into the folder; ``progress.rank<r>.json`` the counts of each rank, saved
atomically after every batch. A rerun into the same folder resumes only a run of the same fingerprint
(else a clear refusal naming what changed, with ``--restart`` to discard the old files), and merges its
experiments with those already there, so finished rows are never dropped. A lock file keeps two runs from
writing one folder at once. Every file read back is checked; a corrupt or foreign one is a clear error.

Faults of the disk are one line and never block a resume: ``RunFolder.open`` refuses a run whose files
clearly do not fit the free space or the file-size limit before it writes them; ``disk_faults`` turns a
write that fails for lack of space or a file-size limit into one line naming the file and the fix (the
temporary files of this process are removed); ``Progress`` drops the counts of configurations whose
predictions are missing or damaged, so that a rerun recomputes them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import resource
import shutil
import sys

from ..runtime import atomic_write_json
from .errors import RunError
from .experiment import Experiment
from .fingerprint import describe_difference, model_count
from .predictions import stored_bytes, unbacked

__all__ = ["Progress", "check_out_path", "RunFolder", "OUTPUT_FILES", "disk_faults", "write_json", "check_space"]

OUTPUT_FILES = ("run.json", "results.json", "results.csv", "table.md", "accuracy_vs_flops.png", "claims.json")
_FIX = "choose another --out, or pass --restart to discard what it holds"


def _read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise RunError(f"{path} is not a readable {what} ({type(e).__name__}: {str(e)[:80]}): {_FIX}") from None


_DISK_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded"}
_RESUME = "rerun with the same --out to resume (finished batches are kept)"


def _disk_message(e, out, what):
    where = re.sub(rf"\.tmp{os.getpid()}(\.png)?$", "", str(e.filename)) if e.filename else what or f"into --out {out}"
    if e.errno == errno.EFBIG:
        return (f"file too large writing {where}: this process's file-size limit (ulimit -f) or the file system's "
                f"was reached; raise the limit (ulimit -f unlimited), then {_RESUME}")
    return f"{_DISK_FULL[e.errno]} writing {where}: free space on that disk, then {_RESUME}"


def _remove_temporaries(out):
    """This process's temporary files (``<name>.tmp<pid>``, ``<name>.tmp<pid>.png``) in ``out`` and its predictions."""
    tag = f".tmp{os.getpid()}"
    for folder in (out, os.path.join(out, "predictions")):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for n in names:
            if n.endswith(tag) or f"{tag}." in n:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, n))


@contextlib.contextmanager
def disk_faults(out, what=None):
    """Within the block, an OSError of a full disk or quota (ENOSPC, EDQUOT) or of a file-size limit (EFBIG) is a
    RunError of one line naming what was written (the error's file, else ``what``, else ``out``) and the fix;
    this process's temporary files are removed first. Other errors pass unchanged."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        _remove_temporaries(out)
        raise RunError(_disk_message(e, out, what)) from None


def write_json(path, obj, **dump_options):
    """``atomic_write_json``; on failure its temporary file is removed and the OSError names ``path``."""
    try:
        atomic_write_json(path, obj, **dump_options)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(f"{path}.tmp{os.getpid()}")
        raise OSError(e.errno, e.strerror, path) from None


def _mb(n):
    return f"{n / 2**20:.1f} MiB"


def _free_bytes(folder):
    """Bytes this process may still write on the disk of ``folder`` (root may use the reserved blocks too)."""
    st = os.statvfs(folder)
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def check_space(out, fingerprint, world, experiments):
    """RunError (one line) when what the run must still write clearly does not fit: its prediction files
    (``predictions.stored_bytes``, less those already there) and a lower bound of its result files exceed
    the free space of ``out``'s disk, or its largest file exceeds this process's file-size limit."""
    images, configs = fingerprint["images"]["count"], model_count(fingerprint) * len(experiments)
    folder = os.path.join(out, "predictions")
    there = sum(e.stat().st_size for e in os.scandir(folder) if e.is_file()) if os.path.isdir(folder) else 0
    need = max(0, stored_bytes(images, configs, world) - there) + 1024 * configs + (64 << 10)
    try:
        free = _free_bytes(out)
    except (OSError, AttributeError):  # no statvfs here: the writes themselves will say
        free = None
    if free is not None and free < need:
        raise RunError(f"--out {out}: the run must write at least {_mb(need)} (predictions of {configs} "
                       f"configuration(s) x {images} images, and the results) but its disk has {_mb(free)} free: free "
                       f"space there, or choose an --out on another disk")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    largest = max(4 * -(-images // world), 512 * configs)  # a float32 prediction array; results.json
    if limit != resource.RLIM_INFINITY and limit < largest:
        raise RunError(f"--out {out}: this process may write files of at most {limit} bytes (ulimit -f) but the run "
                       f"writes files of {largest} bytes or more: raise the limit (ulimit -f unlimited)")


class Progress:
    """Per-rank counts per experiment and per-batch bad-image reports, saved atomically after every batch."""

    def __init__(self, path):
        self.path = path
        self.counts = {}  # key -> {"batches", "top1", "top5", "images", "seconds"}
        self.bad = {}  # batch index -> [messages]
        if os.path.exists(path):
            data = _read_json(path, "progress file of stm_fast.eval")
            if not (isinstance(data, dict) and isinstance(data.get("counts"), dict) and isinstance(data.get("bad"), dict)
                    and all(isinstance(c, dict) and isinstance(c.get("batches"), int)
                            and isinstance(c.get("images"), int) for c in data["counts"].values())):
                raise RunError(f"{path} is not a progress file of stm_fast.eval: {_FIX}")
            self.counts, self.bad = data["counts"], data["bad"]
            self._drop_unbacked()

    def _drop_unbacked(self):
        """Counts whose predictions are missing or damaged (``predictions.unbacked``) are dropped, with a note on
        stderr: their configurations are recomputed, so no count stands without its predictions."""
        name = os.path.basename(self.path)
        if not (name.startswith("progress.") and name.endswith(".json")):
            return
        folder = os.path.join(os.path.dirname(self.path), "predictions")
        lost = unbacked(folder, name[len("progress."):-len(".json")],
                        {k: c["images"] for k, c in self.counts.items() if c["batches"]})
        for key in lost:
            del self.counts[key]
        if lost:
            print(f"note: the predictions of {len(lost)} configuration(s) (e.g. {lost[0]}) are missing or damaged in "
                  f"{folder}: recomputing them", file=sys.stderr)

    def done(self, key):
        return self.counts.get(key, {"batches": 0})["batches"]

    def add(self, key, batch_index, top1, top5, images, seconds, deviation_sums=None):
        """Count one batch of experiment ``key``; ``deviation_sums``: per layer, the class token's relative
        deviation from the baseline summed over the batch's images."""
        c = self.counts.setdefault(key, {"batches": 0, "top1": 0, "top5": 0, "images": 0, "seconds": 0.0})
        assert c["batches"] == batch_index
        c["batches"] += 1
        c["top1"] += top1
        c["top5"] += top5
        c["images"] += images
        c["seconds"] += seconds
        if deviation_sums is not None:
            old = c.get("deviation_sums") or [0.0] * len(deviation_sums)
            c["deviation_sums"] = [a + b for a, b in zip(old, deviation_sums)]

    def expect(self, keys, layers):
        """An entry for every key of the run, with ``layers`` per-layer deviation sums, even where this rank
        scores no image: the ranks add these tables up, so their shapes must not depend on a rank's images."""
        for key in keys:
            c = self.counts.setdefault(key, {"batches": 0, "top1": 0, "top5": 0, "images": 0, "seconds": 0.0})
            if not c.get("deviation_sums"):
                c["deviation_sums"] = [0.0] * layers

    def save(self):
        with disk_faults(os.path.dirname(self.path)):
            write_json(self.path, {"counts": self.counts, "bad": self.bad})


def check_out_path(out):
    """RunError unless ``out`` is (or can be made) a writable folder; checked before any work."""
    probe = os.path.abspath(out)
    while not os.path.exists(probe):
        if os.path.islink(probe):
            target = os.readlink(probe)
            raise RunError(f"--out {out}: {probe} is a symbolic link to {target}, which does not exist (or is a loop of "
                           f"links): create {target}, or choose another --out")
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = "is a file" if probe == os.path.abspath(out) else f"lies inside the file {probe}"
        raise RunError(f"--out {out} {where}, not a folder: choose a folder for the results")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunError(f"--out {out}: {probe} is not writable by this user: choose a folder you can write to")


class RunFolder:
    """The output folder, locked for the run's lifetime (rank 0). ``open`` checks or records ``run.json``."""

    def __init__(self, out):
        self.out = out
        self.lock_file = None

    def lock(self):
        os.makedirs(self.out, exist_ok=True)
        self.lock_file = open(os.path.join(self.out, ".lock"), "a+")
        try:
            fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            self.lock_file.close()
            self.lock_file = None
            raise RunError(f"another run is writing into --out {self.out} right now: wait for it to finish, or choose "
                           f"another --out") from None

    def release(self):
        if self.lock_file is not None:
            fcntl.flock(self.lock_file, fcntl.LOCK_UN)
            self.lock_file.close()
            self.lock_file = None

    def restart(self):
        """Remove what a previous run wrote here (only this tool's files)."""
        for name in os.listdir(self.out):
            if name in OUTPUT_FILES or (name.startswith("progress.rank") and name.endswith(".json")):
                os.remove(os.path.join(self.out, name))
        shutil.rmtree(os.path.join(self.out, "predictions"), ignore_errors=True)

    def open(self, fingerprint, world, experiments, self_check=None):
        """The experiments of the run: those already recorded here (same fingerprint required) followed by the
        new ones; ``run.json`` is (re)written with the union and this run's ``self_check``."""
        path = os.path.join(self.out, "run.json")
        known = []
        if os.path.exists(path):
            old = _read_json(path, "run record of stm_fast.eval")
            if not (isinstance(old, dict) and isinstance(old.get("fingerprint"), dict) and isinstance(old.get("experiments"), list)):
                raise RunError(f"{path} is not a run record of stm_fast.eval: {_FIX}")
            if old["fingerprint"] != fingerprint or old.get("world", 1) != world:
                what = describe_difference(old["fingerprint"], fingerprint) or f"processes ({old.get('world', 1)} -> {world})"
                raise RunError(f"--out {self.out} holds a run of other inputs ({what} changed): its numbers cannot be "
                               f"mixed with these; {_FIX}")
            try:
                known = [Experiment.from_json(e) for e in old["experiments"]]
            except (TypeError, ValueError):
                raise RunError(f"{path} is not a run record of stm_fast.eval: {_FIX}") from None
        merged = known + [e for e in experiments if e not in known]
        check_space(self.out, fingerprint, world, merged)
        with disk_faults(self.out):
            write_json(path, {"fingerprint": fingerprint, "world": world, "experiments": [e.to_json() for e in merged],
                              "self_check": self_check}, indent=1)
        return merged
