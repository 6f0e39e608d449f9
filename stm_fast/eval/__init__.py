"""Accuracy tables for STM and its peers: ``python -m stm_fast.eval`` (the paper's Tables 2 and 3).

With no --data/--checkpoint it runs offline on the embedded default: three small Vision Mambas shipped
with the package, trained on scikit-learn's digits (stm_fast.digits), every cell reported as the mean
and min-max over the three. With --model --checkpoint --data it evaluates an official hustvl/Vim
checkpoint on ImageNet-1k validation images (stm_fast.eval.imagenet lists the accepted layouts).

Every (model, method, rate, options) is evaluated on the same images. Work is saved after every batch
(progress.rank<r>.json in --out, written atomically); rerunning with the same --out resumes and never
recomputes finished work. Under torchrun each process takes every WORLD_SIZE-th image and the counts are
summed, so the numbers equal a single-process run.
Outputs in --out: results.json, results.csv, table.md, accuracy_vs_flops.png.

Parts: cli (options), grid (the experiments), inputs (models and images), imagenet (folder layouts and
labels), run (the batch loop, resume, torch.distributed), progress (resumable counts), report (files).
"""

from .cli import build_parser, main, parse_args
from .errors import RunError
from .experiment import BASELINE, Experiment
from .grid import METHOD_GROUPS, experiments
from .run import evaluate

__all__ = ["main", "parse_args", "build_parser", "evaluate", "experiments", "Experiment", "BASELINE", "METHOD_GROUPS", "RunError"]
