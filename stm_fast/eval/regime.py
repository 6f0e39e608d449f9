"""STM's losses at each rate and schedule of a run, beside the paper's Vim-Ti figures (Table 3, both sides).

The paper's columns are named by percentages, but its text gives them as tokens merged per direction at
every layer: "1, 2, 2 and 2" for "15%, 20%, 30%, 40%", i.e. schedules 2, 4, 4 and 4 (tokens removed after
each layer in total, docs/conventions.md §6). On Vim-Ti's 24 layers those are 11.7% and 23.4% by this
package's rate. So a row of the run is set beside the paper's column of the same name (a rate) or of the
same schedule, and the table says which; the losses are top-1 points lost from the unreduced model (the
paper's Vim-Ti: 76.1% on ImageNet-1k).
"""

from __future__ import annotations

import json

from .experiment import Experiment
from .paired_stats import seed_level
from .report import group_records

__all__ = ["PAPER_VIM_TI_LOSS", "PAPER_SCHEDULES", "regime_table"]

PAPER_VIM_TI_BASELINE = 76.1
PAPER_VIM_TI_LOSS = {0.15: 1.0, 0.2: 1.1, 0.3: 2.8, 0.4: 3.9}  # Table 3, ViM-Ti, both sides: points lost
PAPER_SCHEDULES = {0.15: 2, 0.2: 4, 0.3: 4, 0.4: 4}  # the schedule each column merges, from its text


def _paper_cell(point) -> str:
    """The paper's Vim-Ti loss(es) that stand beside a run's rate or schedule, named by column."""
    if isinstance(point, float):  # a rate; else a schedule: one count per layer, or a list of them
        loss = PAPER_VIM_TI_LOSS.get(round(point, 4))
        return "—" if loss is None else f"-{loss:.1f} (its \"{100 * point:.0f}%\", schedule {PAPER_SCHEDULES[point]})"
    cols = [c for c, s in PAPER_SCHEDULES.items() if s == point] if isinstance(point, int) else []
    if not cols:
        return "—"
    losses = " / ".join(f"-{PAPER_VIM_TI_LOSS[c]:.1f}" for c in cols)
    return f"{losses} (its " + "/".join(f"\"{100 * c:.0f}%\"" for c in cols) + ")"


def _rows(records, stm_label):
    """{point json: [records]} of STM with the run's own options, in first-seen order."""
    return {point: recs for (lab, point), recs in group_records(records).items()
            if lab == stm_label and recs[0]["method"] == "stm"}


def _ratio(point, diff) -> str:
    """How many times the paper's Vim-Ti loss of the column of the same name this run's loss is."""
    loss = PAPER_VIM_TI_LOSS.get(round(point, 4)) if isinstance(point, float) else None
    return "—" if loss is None or diff is None else f"{-diff / loss:.1f}x"


def _row(point, recs, pooled_diff) -> str:
    p = json.loads(point)
    name = f"{100 * p:.0f}%" if isinstance(p, float) else p
    achieved = sum(r["achieved_rate"] for r in recs) / len(recs)
    d = pooled_diff or {}
    delta = "n/a" if d.get("diff") is None else f"{d['diff']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"
    diffs = [r["vs_baseline"]["diff"] for r in recs if (r.get("vs_baseline") or {}).get("diff") is not None]
    seeds = seed_level(diffs)
    method = "n/a" if seeds["ci_low"] is None else \
        f"{seeds['diff']:+.2f} [{seeds['ci_low']:+.2f}, {seeds['ci_high']:+.2f}]"
    spread = f"[{min(diffs):+.2f}, {max(diffs):+.2f}]" if diffs else "n/a"
    paper = _paper_cell(p if recs[0]["rate"] is not None else recs[0]["schedule"])
    ratio = _ratio(p if recs[0]["rate"] is not None else None, d.get("diff"))
    return f"| {name} | {100 * achieved:.1f} | {delta} | {method} | {spread} | {paper} | {ratio} |"


def regime_table(records, stm_options, pooled) -> str:
    """The markdown section (module docstring); "" when the run has no STM row with its own options.
    ``pooled``: {(label, point json): the difference to the baseline pooled over the networks}."""
    stm_label = Experiment.of("stm", 0.0, None, stm_options).label
    rows = _rows(records, stm_label)
    if not rows:
        return ""
    base = [r["top1"] for r in records if r["method"] == "none" and r["top1"] is not None]
    lines = ["STM's losses here beside the paper's Vim-Ti (Table 3, both sides; stm_fast/eval/regime.py):", "",
             "| STM at | achieved rate (%) | Δ top-1, these networks [95% CI] | Δ top-1, the method over seeds "
             "[95% t-interval] | networks' Δ [min, max] | paper Vim-Ti Δ top-1 | loss here / paper's |",
             "|---|---|---|---|---|---|---|"]
    lines += [_row(point, recs, pooled.get((stm_label, point))) for point, recs in rows.items()]
    mean_base = sum(base) / len(base) if base else float("nan")
    lines += ["", f"Unreduced top-1 here {mean_base:.2f}% (mean over networks); the paper's Vim-Ti 76.1% on ImageNet-1k. "
                  f"The paper's columns are schedules (its \"15%\" is schedule 2, 11.7% by this package's rate on 24 "
                  f"layers; its \"20/30/40%\" are all schedule 4, 23.4%): a row at a rate compares by name, a row at a "
                  f"schedule by what is merged. Above 1x the testbed is more fragile than Vim-Ti at that rate."]
    return "\n".join(lines)
