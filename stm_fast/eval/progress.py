"""The output folder of an eval run: what it holds, who writes it, and resumable per-rank progress.

``run.json`` records the run's fingerprint (``stm_fast.eval.fingerprint``), the number of processes and
every experiment ever run into the folder; ``progress.rank<r>.json`` the counts of each rank, saved
atomically after every batch. A rerun into the same folder resumes only a run of the same fingerprint
(else a clear refusal naming what changed, with ``--restart`` to discard the old files), and merges its
experiments with those already there, so finished rows are never dropped. A lock file keeps two runs from
writing one folder at once. Every file read back is checked; a corrupt or foreign one is a clear error.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil

from ..runtime import atomic_write_json
from .errors import RunError
from .experiment import Experiment
from .fingerprint import describe_difference

__all__ = ["Progress", "check_out_path", "RunFolder", "OUTPUT_FILES"]

OUTPUT_FILES = ("run.json", "results.json", "results.csv", "table.md", "accuracy_vs_flops.png", "claims.json")
_FIX = "choose another --out, or pass --restart to discard what it holds"


def _read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise RunError(f"{path} is not a readable {what} ({type(e).__name__}: {str(e)[:80]}): {_FIX}") from None


class Progress:
    """Per-rank counts per experiment and per-batch bad-image reports, saved atomically after every batch."""

    def __init__(self, path):
        self.path = path
        self.counts = {}  # key -> {"batches", "top1", "top5", "images", "seconds"}
        self.bad = {}  # batch index -> [messages]
        if os.path.exists(path):
            data = _read_json(path, "progress file of stm_fast.eval")
            if not (isinstance(data, dict) and isinstance(data.get("counts"), dict) and isinstance(data.get("bad"), dict)
                    and all(isinstance(c, dict) and isinstance(c.get("batches"), int) for c in data["counts"].values())):
                raise RunError(f"{path} is not a progress file of stm_fast.eval: {_FIX}")
            self.counts, self.bad = data["counts"], data["bad"]

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

    def save(self):
        atomic_write_json(self.path, {"counts": self.counts, "bad": self.bad})


def check_out_path(out):
    """RunError unless ``out`` is (or can be made) a writable folder; checked before any work."""
    probe = os.path.abspath(out)
    while not os.path.exists(probe):
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
        atomic_write_json(path, {"fingerprint": fingerprint, "world": world, "experiments": [e.to_json() for e in merged],
                                 "self_check": self_check}, indent=1)
        return merged
