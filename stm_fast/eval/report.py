"""The files of an eval run: results.json, results.csv, table.md (and, through ``figures``, the plot).

The table has one row per configuration, its rate, the achieved rate, top-1 as mean [min, max] over the
run's models, the difference to the baseline pooled over the models with its paired 95% interval,
agreement with the baseline's predictions, top-5 and FLOPs in a readable unit. The best method at each rate
(highest mean top-1 among the reduced rows) is in bold. Throughput is not shown here: an eval is not a
benchmark (``python -m stm_fast.bench`` is).
"""

from __future__ import annotations

import csv
import io
import json
import os

from ..runtime import atomic_write, atomic_write_json
from .experiment import describe

__all__ = ["write_outputs", "markdown_table", "label", "flops_unit", "point_of", "group_records"]

_CSV_FIELDS = ["model", "method", "rate", "achieved_rate", "options", "schedule", "top1", "top5", "agreement",
               "vs_baseline_diff", "vs_baseline_ci_low", "vs_baseline_ci_high", "images", "bad_images", "gflops_paper",
               "gflops_full", "gflops_overhead", "images_per_s"]


def label(rec):
    """How a record's configuration is named (``Experiment.label``)."""
    return rec.get("label") or describe(rec["method"], rec["options"] or {})


def point_of(rec):
    """The rate (a float) or 'schedule S' of a record (``Experiment.point``)."""
    return rec["rate"] if rec["rate"] is not None else f"schedule {rec['schedule']}"


def flops_unit(gflops):
    """(scale, unit) that shows FLOPs of this size readably: G, M or K."""
    for scale, unit in ((1.0, "GFLOPs"), (1e3, "MFLOPs"), (1e6, "KFLOPs")):
        if gflops * scale >= 0.1:
            return scale, unit
    return 1e6, "KFLOPs"


def _range(values, fmt="{:.1f}"):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    if len(values) == 1 or max(values) == min(values):
        return fmt.format(mean)
    return f"{fmt.format(mean)} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def group_records(records):
    """{(label, point json): [records over models]} in first-seen order: one configuration at one point."""
    out = {}
    for r in records:
        out.setdefault((label(r), json.dumps(point_of(r))), []).append(r)
    return out


def _best(groups):
    """The (label, point) of the best reduced configuration at each point (highest mean top-1)."""
    best = {}
    for (lab, point), recs in groups.items():
        tops = [r["top1"] for r in recs if r["top1"] is not None]
        if recs[0]["method"] == "none" or not tops:
            continue
        mean = sum(tops) / len(tops)
        if point not in best or mean > best[point][0]:
            best[point] = (mean, lab)
    return {(lab, p) for p, (_, lab) in best.items()}


def _delta(pooled):
    if pooled is None or pooled.get("diff") is None:
        return "n/a"
    return f"{pooled['diff']:+.1f} [{pooled['ci_low']:+.1f}, {pooled['ci_high']:+.1f}]"


def markdown_table(records, bad, skipped=(), pooled=None):
    """The table (see the module docstring); ``pooled``: {(label, point json): pooled vs-baseline stats}."""
    models = sorted({r["model"] for r in records})
    scale, unit = flops_unit(min(r["gflops_paper"] for r in records))
    spread = "mean [min, max] over models" if len(models) > 1 else "one model"
    head = (f"| method | rate | achieved (%) | top-1 (%) | Δ top-1 vs baseline [95% CI] | agreement (%) | top-5 (%) "
            f"| {unit} paper | {unit} full |\n|---|---|---|---|---|---|---|---|---|")
    groups = group_records(records)
    best = _best(groups)
    rows = []
    for (lab, point), recs in groups.items():
        p = json.loads(point)
        rate = f"{100 * p:.0f}%" if isinstance(p, float) else str(p)
        top1 = _range([r["top1"] for r in recs])
        if (lab, point) in best:
            top1, lab = f"**{top1}**", f"**{lab}**"
        rows.append("| " + " | ".join([
            lab, rate, _range([100 * r["achieved_rate"] for r in recs]), top1,
            "—" if recs[0]["method"] == "none" else _delta((pooled or {}).get((label(recs[0]), point))),
            _range([r["agreement"] for r in recs]), _range([r["top5"] for r in recs]),
            _range([scale * r["gflops_paper"] for r in recs], "{:.4g}"),
            _range([scale * r["gflops_full"] for r in recs], "{:.4g}")]) + " |")
    n_img = max((r["images"] for r in records), default=0)
    note = (f"\n{n_img} images per cell; top-1, agreement and top-5 as {spread} ({', '.join(models)}); Δ pooled over "
            f"the models, paired on the same images (95% cluster-bootstrap interval by image); **bold**: the best method at each rate; "
            f"{len(bad)} unreadable image(s) excluded" + (f"; {len(skipped)} non-regular file(s) skipped unopened." if skipped
                                                          else "."))
    return "\n".join([head, *rows]) + note


def write_outputs(out, records, bad, skipped=(), pooled=None, sections=()):
    """results.json (every record, with the bad and skipped files), results.csv and table.md (the table, then
    each of ``sections``), each written atomically. Returns table.md's text."""
    records = [{**r, "bad_image_files": list(bad), "skipped_file_list": list(skipped)} for r in records]
    atomic_write_json(os.path.join(out, "results.json"), records, indent=1)
    rows = io.StringIO()
    w = csv.DictWriter(rows, fieldnames=_CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in records:
        vs = r.get("vs_baseline") or {}
        w.writerow({**r, "options": json.dumps(r["options"], sort_keys=True),
                    "schedule": json.dumps(r["schedule"]) if r["schedule"] is not None else "",
                    "vs_baseline_diff": vs.get("diff"), "vs_baseline_ci_low": vs.get("ci_low"),
                    "vs_baseline_ci_high": vs.get("ci_high")})
    atomic_write(os.path.join(out, "results.csv"), rows.getvalue())
    table = "\n\n".join([markdown_table(records, bad, skipped, pooled), *[t for t in sections if t]])
    atomic_write(os.path.join(out, "table.md"), table + "\n")
    return table
