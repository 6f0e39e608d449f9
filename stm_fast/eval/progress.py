"""Resumable progress of an eval run: per-rank counts saved atomically after every batch, and the run's
settings in ``run.json`` so that a rerun into the same folder resumes only the same run."""

from __future__ import annotations

import json
import os

from ..runtime import atomic_write_json
from .errors import RunError

__all__ = ["Progress", "check_run_folder", "write_run_file"]


class Progress:
    """Per-rank counts per experiment and per-batch bad-image reports, saved atomically after every batch."""

    def __init__(self, path):
        self.path = path
        self.counts = {}  # key -> {"batches", "top1", "top5", "images", "seconds"}
        self.bad = {}  # batch index -> [messages]
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            self.counts, self.bad = data["counts"], data["bad"]

    def done(self, key):
        return self.counts.get(key, {"batches": 0})["batches"]

    def add(self, key, batch_index, top1, top5, images, seconds):
        c = self.counts.setdefault(key, {"batches": 0, "top1": 0, "top5": 0, "images": 0, "seconds": 0.0})
        assert c["batches"] == batch_index
        c["batches"] += 1
        c["top1"] += top1
        c["top5"] += top5
        c["images"] += images
        c["seconds"] += seconds

    def save(self):
        atomic_write_json(self.path, {"counts": self.counts, "bad": self.bad})


def check_run_folder(out, settings, world):
    """RunError if ``out`` holds a run with other settings (resuming would mix two runs' numbers)."""
    run_file = os.path.join(out, "run.json")
    if not os.path.exists(run_file):
        return
    with open(run_file) as f:
        old = json.load(f)
    if old.get("settings") != settings or old.get("world", 1) != world:
        raise RunError(f"--out {out} holds a run with other settings ({old.get('settings')}, {old.get('world', 1)} "
                       f"process(es)); resume with the same settings, or choose a new --out")


def write_run_file(out, settings, world):
    """Create ``out`` and record the run's settings there (once; a resumed run finds them)."""
    os.makedirs(out, exist_ok=True)
    run_file = os.path.join(out, "run.json")
    if not os.path.exists(run_file):
        atomic_write_json(run_file, {"settings": settings, "world": world}, indent=1)
