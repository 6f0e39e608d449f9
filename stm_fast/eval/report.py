"""Tables, files and the plot of an eval run (results.json / results.csv / table.md / accuracy_vs_flops.png)."""

from __future__ import annotations

import csv
import io
import json
import os

from ..reduction import STM_DEFAULTS
from ..runtime import atomic_write, atomic_write_json

__all__ = ["write_outputs", "markdown_table"]

_CSV_FIELDS = ["model", "method", "rate", "achieved_rate", "options", "schedule", "top1", "top5", "images", "bad_images",
               "gflops_paper", "gflops_full", "gflops_overhead", "images_per_s"]


def _label(rec):
    if rec["method"] == "none":
        return "baseline (no reduction)"
    opts = rec["options"] or {}
    if rec["method"] == "stm":
        extra = [f"{k}={v}" for k, v in opts.items() if STM_DEFAULTS.get(k) != v]
        return "stm" + (f" ({', '.join(extra)})" if extra else "")
    return rec["method"] + (f" ({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else "")


def _stat(values, digits=1, fmt=None):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    f = (lambda v: format(v, fmt)) if fmt else (lambda v: f"{v:.{digits}f}")  # noqa: E731
    mean = sum(values) / len(values)
    if len(values) == 1 or max(values) == min(values):
        return f(mean)
    return f"{f(mean)} [{f(min(values))}-{f(max(values))}]"


def _groups(records):
    """{(label, rate/schedule): [records over models]} in first-seen order."""
    out = {}
    for r in records:
        point = r["rate"] if r["schedule"] is None else f"schedule {r['schedule']}"
        out.setdefault((_label(r), json.dumps(point)), []).append(r)
    return out


def markdown_table(records, bad, skipped=()):
    models = sorted({r["model"] for r in records})
    base = {r["model"]: r["top1"] for r in records if r["method"] == "none"}
    n_models = len(models)
    head = ("| method | rate | achieved | top-1 (%) | Δ top-1 | top-5 (%) | GFLOPs paper | GFLOPs full | images/s |\n"
            "|---|---|---|---|---|---|---|---|---|")
    rows = []
    for (label, point), recs in _groups(records).items():
        point_v = json.loads(point)
        rate = f"{100 * point_v:.0f}%" if isinstance(point_v, float) else str(point_v)
        deltas = [r["top1"] - base[r["model"]] for r in recs if base.get(r["model"]) is not None and r["top1"] is not None]
        rows.append("| " + " | ".join([
            label, rate, _stat([100 * r["achieved_rate"] for r in recs]), _stat([r["top1"] for r in recs]),
            _stat(deltas), _stat([r["top5"] for r in recs]), _stat([r["gflops_paper"] for r in recs], fmt=".4g"),
            _stat([r["gflops_full"] for r in recs], fmt=".4g"), _stat([r["images_per_s"] for r in recs], 0)]) + " |")
    n_img = max((r["images"] for r in records), default=0)
    note = (f"\n{n_img} images per cell; " + (f"mean [min-max] over {n_models} models ({', '.join(models)}); "
            if n_models > 1 else f"model {models[0]}; ") + f"{len(bad)} unreadable image(s) excluded"
            + (f"; {len(skipped)} non-regular file(s) skipped unopened." if skipped else "."))
    return "\n".join([head, *rows]) + note


def _plot(path, records):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    curves = {}
    for (label, point), recs in _groups(records).items():
        ok = [r for r in recs if r["top1"] is not None]
        if ok:
            g = sum(r["gflops_paper"] for r in ok) / len(ok)
            a = sum(r["top1"] for r in ok) / len(ok)
            curves.setdefault(label, []).append((g, a))
    base = curves.pop("baseline (no reduction)", [])
    for label, pts in curves.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    for g, a in base:
        ax.scatter([g], [a], marker="*", s=160, color="black", zorder=5, label="baseline")
    ax.set_xlabel("GFLOPs per image (paper convention)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_outputs(out, records, bad, skipped=()):
    """results.json (every record, with the bad and skipped files), results.csv, table.md and the plot;
    each file written atomically. Returns the table."""
    records = [{**r, "bad_image_files": list(bad), "skipped_file_list": list(skipped)} for r in records]
    atomic_write_json(os.path.join(out, "results.json"), records, indent=1)
    rows = io.StringIO()
    w = csv.DictWriter(rows, fieldnames=_CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in records:
        w.writerow({**r, "options": json.dumps(r["options"], sort_keys=True),
                    "schedule": json.dumps(r["schedule"]) if r["schedule"] is not None else ""})
    atomic_write(os.path.join(out, "results.csv"), rows.getvalue())
    table = markdown_table(records, bad, skipped)
    atomic_write(os.path.join(out, "table.md"), table + "\n")
    _plot(os.path.join(out, "accuracy_vs_flops.png"), records)
    return table
