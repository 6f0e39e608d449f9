"""The eval's figures: accuracy vs FLOPs (two panels) and, with ``--figures``, the paper's Figure 1 and 3.

With ``--figures`` the eval also writes, for the first model: ``figure1_<model>_image<i>.png`` for its
first two readable images (``stm_fast.analysis.hidden_state_maps``: per-layer maps of both directions'
hidden-state norms and of the class token's hidden attention) and ``figure3_class_token_deviation.png`` (the class
token's per-layer deviation from the unreduced model, ``layer_losses``, for every configuration of the run
at the rate closest to 20%, on up to 64 images).

``accuracy_vs_flops.png``: left, STM (its default configuration of the run, black) against every peer at
the same FLOPs, mean top-1 over the run's models with each point's min-max as a thin bar; right, STM's ablations (weight variants
and one side) as the difference of top-1 to the plain average (``weights="avg"``), pooled over the models
with its paired 95% interval, at each rate. Units follow the models' size (G, M or KFLOPs).
"""

from __future__ import annotations

import os

import torch

import json

import numpy as np

from ..analysis import (hidden_state_maps, layer_losses, lsq_weights_used, plot_hidden_state_maps, plot_layer_losses,
                        weight_summary)
from ..runtime import atomic_write_json
from .inputs import first_images
from .report import flops_unit, label, point_of

__all__ = ["plot_accuracy_vs_flops", "write_paper_figures", "hsp_weights", "plot_hsp_deviation", "weights_text"]


def _save(fig, path):
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp)
    os.replace(tmp, path)


_STYLES = [(c, ls) for ls in ("-", "--", ":") for c in
           ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
            "tab:olive", "tab:cyan")]  # 30 distinct (colour, line style) pairs: no two series look alike


def _curves(records, stm_label, scale):
    """{label: [(FLOPs, [top-1 per model])]} of STM's default configuration and every peer, by FLOPs."""
    curves = {}
    for r in records:
        lab = label(r)
        if r["top1"] is None or r["method"] == "none" or (r["method"] == "stm" and lab != stm_label):
            continue
        curves.setdefault(lab, {}).setdefault(str(point_of(r)), []).append(r)
    return {lab: sorted((sum(scale * r["gflops_paper"] for r in rs) / len(rs), [r["top1"] for r in rs])
                        for rs in points.values()) for lab, points in curves.items()}


def _methods_panel(ax, records, stm_label, scale, unit, n_models):
    """Mean top-1 against FLOPs per method; with several models, each point's min-max as a thin bar."""
    curves = _curves(records, stm_label, scale)
    order = [stm_label] + [k for k in curves if k != stm_label] if stm_label in curves else list(curves)
    for i, lab in enumerate(order):
        rows = curves[lab]
        colour, ls = ("black", "-") if lab == stm_label else _STYLES[i % len(_STYLES)]
        x, mean = [g for g, _ in rows], [sum(t) / len(t) for _, t in rows]
        ax.plot(x, mean, marker="o", ms=4, color=colour, ls=ls, lw=2.6 if lab == stm_label else 1.3, label=lab,
                zorder=4 if lab == stm_label else 3)
        if n_models > 1:
            ax.vlines(x, [min(t) for _, t in rows], [max(t) for _, t in rows], color=colour, lw=0.8, alpha=0.6)
    base = [r for r in records if r["method"] == "none" and r["top1"] is not None]
    if base:
        g = sum(scale * r["gflops_paper"] for r in base) / len(base)
        ax.scatter([g], [sum(r["top1"] for r in base) / len(base)], marker="*", s=180, color="black", zorder=5,
                   label="baseline (no reduction)")
    ax.set_xlabel(f"{unit} per image (paper convention)")
    spread = "mean over models, bars: min-max" if n_models > 1 else "one model"
    ax.set_ylabel(f"top-1 accuracy (%): {spread}")
    ax.set_title("STM (black) and its peers at equal FLOPs")
    ax.grid(alpha=0.3)


def _ablation_panel(ax, ablations):
    if not ablations:
        ax.text(0.5, 0.5, "no plain-average (weights=avg) rows in this run", ha="center", va="center", fontsize=8)
        ax.set_axis_off()
        return
    by_variant = {}
    for a in ablations:
        by_variant.setdefault(a["variant"], []).append(a)
    width = 2.4 / max(len(by_variant), 1)  # every variant's bars side by side within 2.4 points of the rate
    for i, (variant, rows) in enumerate(by_variant.items()):
        rows = sorted(rows, key=lambda a: a["rate"])
        x = [100 * a["rate"] + width * (i - (len(by_variant) - 1) / 2) for a in rows]
        err = [[a["diff"] - a["ci_low"] for a in rows], [a["ci_high"] - a["diff"] for a in rows]]
        colour, ls = _STYLES[i % len(_STYLES)]
        ax.errorbar(x, [a["diff"] for a in rows], yerr=err, marker="os^vD<>p"[i % 8], ms=4, capsize=2, color=colour,
                    ls=ls, lw=1, label=variant)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("token reduction rate (%)")
    ax.set_ylabel("top-1 minus the plain average's (points, 95% CI)")
    ax.set_title("STM's variants against weights=avg")
    ax.grid(alpha=0.3)


def plot_accuracy_vs_flops(path, records, stm_label, ablations, title):
    """Write the two-panel figure (see the module docstring) to ``path``; legends sit below their panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, unit = flops_unit(min(r["gflops_paper"] for r in records))
    n_models = len({r["model"] for r in records if r["method"] == "none"}) or 1
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 7.2), dpi=120)
    _methods_panel(left, records, stm_label, scale, unit, n_models)
    _ablation_panel(right, [a for a in ablations if isinstance(a["rate"], float)])
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
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
    reduced_points = sorted({e.rate for e in run.exps if e.method != "none" and e.rate is not None}, key=lambda r: abs(r - 0.2))
    point = reduced_points[0] if reduced_points else None
    curves = {e.label: layer_losses(model, images, run.plans[e.key(name)])
              for e in run.exps if e.method != "none" and (e.rate == point or point is None)}
    if curves:
        path = os.path.join(out, "figure3_class_token_deviation.png")
        what = f"{100 * point:.0f}%" if point is not None else "the run's schedules"
        paths.append(plot_layer_losses(curves, path, title=f"Figure 3: class-token deviation per layer, {name} at "
                                                           f"{what} ({len(images)} images)"))
    return paths


def hsp_weights(run, dataset, n_images=64):
    """{point: weight_summary} of the lsq weights STM's default configuration computes on the first model's
    first ``n_images`` images at each point of the run, written to ``lsq_weights.json`` with a histogram
    (``lsq_weights.png``); {} when the run has no such configuration."""
    name, model = run.models[0]
    images = first_images(dataset, n_images)
    stm = [e for e in run.exps if e.method == "stm" and e.opts == run.args.stm_options and not e.note]
    if images is None or not stm or run.args.stm_options.get("weights") != "lsq" \
            or run.args.stm_options.get("positions") != "ends":
        return {}
    samples = {json.dumps(e.point): lsq_weights_used(model, images.to(run.device), run.plans[e.key(name)]) for e in stm}
    out = {k: {**weight_summary(w), "model": name, "images": int(len(images))} for k, w in samples.items()}
    atomic_write_json(os.path.join(run.args.out, "lsq_weights.json"), out, indent=1)
    _plot_weights(os.path.join(run.args.out, "lsq_weights.png"), samples, f"{name}, {len(images)} images")
    return out


def _plot_weights(path, samples, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for point, w in samples.items():
        p = json.loads(point)
        lab = f"{100 * p:.0f}%" if isinstance(p, float) else str(p)
        ax.hist(np.clip(w, -1, 3), bins=80, histtype="step", label=f"{lab} ({len(w)} weights)")
    ax.axvline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xlabel("HSP's lsq weight w_j (eq. 11), clipped to [-1, 3]; 1 = a plain sum")
    ax.set_ylabel("count")
    ax.set_title(f"STM's merge weights: {title}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def weights_text(summaries) -> str:
    """One line per point: the lsq weights' median and spread, and whether they are close to 1."""
    lines = []
    for point, s in summaries.items():
        p = json.loads(point)
        lab = f"{100 * p:.0f}%" if isinstance(p, float) else str(p)
        close = "close to 1 (HSP is then nearly a plain sum)" if s["near_1"] >= 0.5 else "not close to 1"
        lines.append(f"- HSP's lsq weights at {lab} ({s['model']}, {s['n']} weights on {s['images']} images): median "
                     f"{s['median']:.2f}, 5-95% [{s['q05']:.2f}, {s['q95']:.2f}], {100 * s['near_1']:.0f}% within 0.1 of 1, "
                     f"{100 * s['negative']:.0f}% negative: {close}")
    return "\n".join(lines)


def _deviation_curves(records):
    """{rate: {weights: [per-layer class-token deviation per model]}} of STM, ends positions, both sides."""
    curves = {}
    for r in records:
        if r["method"] != "stm" or not r.get("cls_deviation") or r.get("note") or not isinstance(r["rate"], float):
            continue
        o = r["options"]
        if o.get("positions", "ends") != "ends" or o.get("start_layer", 0) != 0 or o.get("sides", "both") != "both":
            continue
        curves.setdefault(r["rate"], {}).setdefault(o.get("weights", "lsq"), []).append(r["cls_deviation"])
    return curves


def plot_hsp_deviation(path, records, title=""):
    """The class token's deviation from the baseline per layer (the paper's Figure 3 measure), mean over the
    images and models, for each of STM's weight variants divided by the plain average's (1: the same; below
    1: closer to the unreduced model), one panel per rate: the variants' raw curves lie on top of each other
    on a log scale. Returns the path, or None without the curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {rate: by_w for rate, by_w in _deviation_curves(records).items() if "avg" in by_w}
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 4.6), dpi=110, squeeze=False)
    for ax, (rate, by_w) in zip(axes[0], sorted(curves.items())):
        avg = np.mean(by_w["avg"], axis=0)
        for i, (w, rows) in enumerate(sorted(by_w.items(), key=lambda kv: kv[0] != "lsq")):
            colour, ls = ("black", "-") if w == "lsq" else _STYLES[i % len(_STYLES)]
            ratio = np.mean(rows, axis=0) / np.where(avg > 0, avg, np.nan)
            ax.plot(ratio, color=colour, ls=ls, lw=2.2 if w == "lsq" else 1.2, label="lsq (HSP)" if w == "lsq" else w)
        ax.axhline(1.0, color="black", lw=0.6)
        ax.set_title(f"{100 * rate:.0f}%", fontsize=9)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("class-token deviation / the plain average's")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(title or "STM's weight variants: the class token's deviation from the unreduced model, relative "
                          "to the plain average (1 = the same)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path
