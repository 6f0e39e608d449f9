"""Accuracy tables for STM and its peers: ``python -m stm_fast.eval`` (the paper's Tables 2 and 3).

With no --data/--checkpoint it runs offline on an embedded testbed (``--testbed``: digits by default,
paper-geometry, fashion-mnist; ``stm_fast.digits``): small Vision Mambas shipped with the package, every
cell reported as the mean and min-max over them. With --model --checkpoint --data it evaluates an official
hustvl/Vim checkpoint on ImageNet-1k validation images (stm_fast.eval.imagenet lists the accepted layouts).

Every (model, method, rate, options) is evaluated on the same images. Work is saved after every batch
(progress.rank<r>.json in --out, written atomically); rerunning with the same --out resumes and never
recomputes finished work. Under torchrun each process takes every WORLD_SIZE-th image and the counts are
summed, so the numbers equal a single-process run.
Outputs in --out (docs/eval.md § Files): run.json (the settings, their fingerprint, the self-check),
results.json, results.csv, claims.json, table.md, the per-image predictions, the plots (accuracy against
FLOPs, HSP's deviation, the lsq weights), and with --figures the paper's Figures 1 and 3.

Parts: cli (options, ``EvalConfig``), groups (the --methods groups, a registry), grid (the experiments),
experiment (one configuration as a value), inputs (models and images), imagenet (folder layouts and
labels), preflight (checks before work), run (the batch loop, resume, torch.distributed), progress
(resumable counts), predictions and paired_stats (per-image results and their statistics), claims (the
paper's claims tested), paper (--paper settings), results / report / figures (files).
"""

from .cli import build_parser, main, parse_args
from .errors import RunError
from .experiment import BASELINE, Experiment
from .grid import METHOD_GROUPS, experiments
from .run import evaluate

__all__ = ["main", "parse_args", "build_parser", "evaluate", "experiments", "Experiment", "BASELINE", "METHOD_GROUPS", "RunError"]
