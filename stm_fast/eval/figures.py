"""The eval's figures: accuracy vs FLOPs (two panels) and, with ``--figures``, the paper's Figure 1 and 3.

With ``--figures`` the eval also writes, for the first model: ``figure1_<model>_image<i>.png`` for its
first two readable images (``stm_fast.analysis.hidden_state_maps``: per-layer maps of both directions'
hidden-state norms and of the class token's hidden attention) and ``figure3_layer_losses.png`` (the class
token's per-layer deviation from the unreduced model, ``layer_losses``, for every configuration of the run
at the rate closest to 20%, on up to 64 images).

``accuracy_vs_flops.png``: left, STM (its default configuration of the run) against every peer at the
same FLOPs, mean top-1 over the run's models with a min-max band; right, STM's ablations (weight variants
and one side) as the difference of top-1 to the plain average (``weights="avg"``), pooled over the models
with its paired 95% interval, at each rate. Units follow the models' size (G, M or KFLOPs).
"""

from __future__ import annotations

import os

import torch

from ..analysis import hidden_state_maps, layer_losses, plot_hidden_state_maps, plot_layer_losses
from .grid import exp_key
from .inputs import first_images
from .report import flops_unit, label, point_of

__all__ = ["plot_accuracy_vs_flops", "write_paper_figures"]


def _save(fig, path):
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp)
    os.replace(tmp, path)


def _methods_panel(ax, records, stm_label, scale, unit):
    base = [r for r in records if r["method"] == "none" and r["top1"] is not None]
    curves = {}
    for r in records:
        lab = label(r)
        if r["top1"] is None or r["method"] == "none" or (r["method"] == "stm" and lab != stm_label):
            continue
        curves.setdefault(lab, {}).setdefault(str(point_of(r)), []).append(r)
    for lab, points in curves.items():
        rows = sorted((sum(scale * r["gflops_paper"] for r in rs) / len(rs), [r["top1"] for r in rs]) for rs in points.values())
        x = [g for g, _ in rows]
        ax.plot(x, [sum(t) / len(t) for _, t in rows], marker="o", lw=2.5 if lab == stm_label else 1.5, label=lab)
        ax.fill_between(x, [min(t) for _, t in rows], [max(t) for _, t in rows], alpha=0.15)
    if base:
        g = sum(scale * r["gflops_paper"] for r in base) / len(base)
        ax.scatter([g], [sum(r["top1"] for r in base) / len(base)], marker="*", s=180, color="black", zorder=5,
                   label="baseline")
    ax.set_xlabel(f"{unit} per image (paper convention)")
    ax.set_ylabel("top-1 accuracy (%): mean, band = min-max over models")
    ax.set_title("STM and its peers at equal FLOPs")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _ablation_panel(ax, ablations):
    if not ablations:
        ax.text(0.5, 0.5, "no plain-average (weights=avg) rows in this run", ha="center", va="center", fontsize=8)
        ax.set_axis_off()
        return
    by_variant = {}
    for a in ablations:
        by_variant.setdefault(a["variant"], []).append(a)
    for i, (variant, rows) in enumerate(by_variant.items()):
        rows = sorted(rows, key=lambda a: a["rate"])
        x = [100 * a["rate"] + 0.4 * (i - len(by_variant) / 2) for a in rows]  # small offsets keep bars apart
        y = [a["diff"] for a in rows]
        err = [[a["diff"] - a["ci_low"] for a in rows], [a["ci_high"] - a["diff"] for a in rows]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=variant)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("token reduction rate (%)")
    ax.set_ylabel("top-1 difference to the plain average (points, 95% CI)")
    ax.set_title("STM's ablations against weights=avg")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_accuracy_vs_flops(path, records, stm_label, ablations, title):
    """Write the two-panel figure (see the module docstring) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, unit = flops_unit(min(r["gflops_paper"] for r in records))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120)
    _methods_panel(left, records, stm_label, scale, unit)
    _ablation_panel(right, [a for a in ablations if isinstance(a["rate"], float)])
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def write_paper_figures(run, dataset):
    """Figures 1 and 3 of the paper for the run's first model (see the module docstring); returns the paths."""
    name, model = run.models[0]
    images = first_images(dataset, 64)
    if images is None:
        return []
    images = images.to(run.device)
    out, paths = run.args.out, []
    maps = hidden_state_maps(model, images[:2])
    for i in range(min(2, len(images))):
        path = os.path.join(out, f"figure1_{name}_image{i}.png")
        paths.append(plot_hidden_state_maps(maps, path, image=i, title=f"{name}, image {i}: hidden states per layer"))
    reduced_points = sorted({e[1] for e in run.exps if e[0] != "none" and e[1] is not None}, key=lambda r: abs(r - 0.2))
    point = reduced_points[0] if reduced_points else None
    curves = {label({"method": e[0], "options": e[3]}): layer_losses(model, images, run.plans[exp_key(name, e)])
              for e in run.exps if e[0] != "none" and (e[1] == point or point is None)}
    if curves:
        path = os.path.join(out, "figure3_layer_losses.png")
        what = f"{100 * point:.0f}%" if point is not None else "the run's schedules"
        paths.append(plot_layer_losses(curves, path, title=f"{name} at {what}: class-token deviation per layer "
                                                           f"({len(images)} images)"))
    return paths
