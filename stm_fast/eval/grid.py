"""The experiment grid of an eval run: which ``Experiment``s are evaluated, baseline first (docs/eval.md § Grid).
The groups themselves are registry entries (``eval/groups.py``)."""

from __future__ import annotations

from .experiment import BASELINE
from .groups import DEFAULT_GROUPS, GROUPS, Point

__all__ = ["DEFAULT_RATES", "METHOD_GROUPS", "DEFAULT_GROUPS", "experiments", "unique"]

DEFAULT_RATES = (0.15, 0.2, 0.3, 0.4)
METHOD_GROUPS = tuple(GROUPS)  # the --methods vocabulary, "none" first (the baseline alone)


def experiments(groups, rates, schedule, stm_options, cfg):
    """(experiments, notes): the ``Experiment``s to evaluate on models of configuration ``cfg``, baseline
    first, without duplicates, and one line for each control left out. ``schedule`` (tokens removed after
    each layer in total, docs/conventions.md §6) replaces the rates."""
    out, notes = [BASELINE], []
    points = [Point(None, schedule, stm_options, cfg)] if schedule is not None else \
        [Point(r, None, stm_options, cfg) for r in rates]
    for g in groups:
        for point in points:
            exps, why = GROUPS[g].experiments(point)
            out += exps
            notes += why
    return unique(out), notes


def unique(exps):
    """The experiments without repetitions, in first-seen order."""
    return list(dict.fromkeys(exps))
