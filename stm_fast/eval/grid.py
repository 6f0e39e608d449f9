"""The experiment grid of an eval run: which ``Experiment``s are evaluated, baseline first (docs/eval.md § Grid).
The groups themselves are registry entries (``eval/groups.py``).

A grid is a tuple of blocks ``(groups, rates, schedule)``: every group of a block at each of its rates, or at
its schedule. The command line makes one block (``--methods`` x ``--rates``, or ``--schedule``); a testbed
may name its own default blocks (``Testbed.eval_grid``), used when neither ``--methods`` nor ``--rates`` is
given.
"""

from __future__ import annotations

from .experiment import BASELINE
from .groups import DEFAULT_GROUPS, GROUPS, Point

__all__ = ["DEFAULT_RATES", "METHOD_GROUPS", "DEFAULT_GROUPS", "experiments", "unique", "block_points", "grid_groups", "describe_grid"]

DEFAULT_RATES = (0.15, 0.2, 0.3, 0.4)
METHOD_GROUPS = tuple(GROUPS)  # the --methods vocabulary, "none" first (the baseline alone)


def block_points(block):
    """[(rate, schedule)] of one block: its schedule alone when it has one, else each of its rates."""
    groups, rates, schedule = block
    return [(None, schedule)] if schedule is not None else [(r, None) for r in rates]


def describe_grid(grid) -> str:
    """A grid in words, block by block: 'every default group at 0.2; stm at 0.15 0.3 0.4; stm at --schedule 4'."""
    parts = []
    for groups, rates, schedule in grid:
        who = "every default group" if groups is None else " ".join(groups)
        where = f"--schedule {schedule}" if schedule is not None else " ".join(str(r) for r in rates)
        parts.append(f"{who} at {where}")
    return "; ".join(parts)


def grid_groups(grid):
    """The method groups a grid runs, in first-seen order (a block's ``None`` is the default groups)."""
    return tuple(dict.fromkeys(g for groups, _, _ in grid for g in (DEFAULT_GROUPS if groups is None else groups)))


def experiments(grid, stm_options, cfg):
    """(experiments, notes): the ``Experiment``s of ``grid`` (module docstring) on models of configuration
    ``cfg``, baseline first, without duplicates, and one line for each control left out. A schedule is the
    tokens removed after each layer in total (docs/conventions.md §6)."""
    out, notes = [BASELINE], []
    for block in grid:
        groups = DEFAULT_GROUPS if block[0] is None else block[0]
        points = [Point(rate, schedule, stm_options, cfg) for rate, schedule in block_points(block)]
        for g in groups:
            for point in points:
                exps, why = GROUPS[g].experiments(point)
                out += exps
                notes += why
    return unique(out), notes


def unique(exps):
    """The experiments without repetitions, in first-seen order."""
    return list(dict.fromkeys(exps))
