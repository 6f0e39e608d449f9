"""The paper's claims as paired comparisons on the run's own images, with a verdict (``claims.json``;
docs/eval.md § Claims and statistics).

For each rate (or schedule) of the run, the pairs (a, b) the grid makes possible:

1. ``HSP vs plain average`` (STM's lsq weights vs ``weights="avg"``), ``HSP vs drop``, ``HSP vs size-weighted
   average`` (ToMe's merge, ``weights="size"``), ``joint fit vs HSP`` (``weights="lsq_joint"`` vs lsq);
2. the controls where merged tokens sit nearer the class token: ``HSP vs plain average`` with uniform
   positions and with merges in the second half only;
3. ``both sides vs one side``;
4. ``STM vs <peer>`` for every peer at the same rate, its released flavours and its run at STM's own
   layers and counts included;
5. ``<peer> <flavour> flavour vs paper``.

Each claim is tested pooled over the run's models (``paired_stats.compare``: cluster bootstrap by image,
sign-flip test, TOST at +-1 point) and for each model alone. The pooled tests of every claim (difference
and equivalence) form one family, Holm-adjusted; each model's tests form its own family. Verdict
(``verdict``): ``supported`` / ``contradicted`` when the adjusted difference test rejects and every model's
difference has the same sign (else ``models disagree``), ``equivalent`` when the adjusted TOST rejects and
every model's difference is within the margin, else ``inconclusive``. The finer measures (agreement with the
baseline, KL divergence from it, the class token's final deviation from it) are reported for STM-vs-STM
claims as descriptive differences with a cluster-bootstrap interval; they do not enter the verdict.
"""

from __future__ import annotations

import numpy as np

from ..reduction import STM_DEFAULTS
from .experiment import BASELINE, Experiment
from .grid import late_start
from .paired_stats import ALPHA, MARGIN, cluster_bootstrap, compare, holm
from .predictions import correct

__all__ = ["claims", "claims_text", "verdict", "claim_pairs"]

_HSP_PAIRS = (("avg", "HSP vs plain average"), ("drop", "HSP vs drop"), ("size", "HSP vs size-weighted average"))


def _stm_at(point, stm_options, achieved, exps):
    """STM's experiment compared with a peer at ``point``: at the same point, else (the paper's settings, where
    STM runs a schedule and the peers a rate) STM at a schedule whose achieved rate is that rate (±0.5 point)."""
    same = [e for e in exps if e.method == "stm" and e.opts == stm_options and e.point == point]
    if same or not isinstance(point, float):
        return same[0] if same else None
    for e in exps:
        if e.method == "stm" and e.opts == stm_options and e.schedule is not None and abs(achieved[e] - point) <= 0.005:
            return e
    return None


def _stm_pairs(base, stm_options, depth):
    """The STM-vs-STM claims (a, b) for STM's experiment ``base`` (items 1-3 of the module docstring)."""
    w = stm_options.get("weights", STM_DEFAULTS["weights"])
    out = [(claim, base, base.with_options(weights=v)) for v, claim in _HSP_PAIRS if w != v]
    if w != "lsq_joint":
        out.append(("joint fit vs HSP", base.with_options(weights="lsq_joint"), base))
    uniform = base.with_options(positions="uniform")
    late = base.with_options(start_layer=late_start(depth))
    out += [("HSP vs plain average, uniform positions", uniform, uniform.with_options(weights="avg")),
            (f"HSP vs plain average, merges after layer {late_start(depth)} only", late, late.with_options(weights="avg"))]
    if stm_options.get("sides", "both") == "both":
        side = "right" if stm_options.get("sides") == "right" else "left"
        out.append(("both sides vs one side", base, base.with_options(sides=side)))
    return out


def claim_pairs(exps, stm_options, achieved, depth):
    """[(claim, experiment a, experiment b)] with both experiments in ``exps``."""
    present, out = set(exps), []
    points = list(dict.fromkeys(e.point for e in exps if e.method != "none"))
    for point in points:
        base = next((e for e in exps if e.method == "stm" and e.opts == stm_options and e.point == point), None)
        if base is not None:
            out += _stm_pairs(base, stm_options, depth)
        peers = [e for e in exps if e.method not in ("none", "stm") and e.point == point]
        stm = _stm_at(point, stm_options, achieved, exps)
        if stm is not None:
            out += [(f"STM vs {e.label}", stm, e) for e in peers]
        for e in peers:
            paper = Experiment.of(e.method, e.rate, e.schedule_value)
            if e.opts.get("flavour"):
                out.append((f"{e.method} {e.opts['flavour']} flavour vs paper", e, paper))
    return [(c, a, b) for c, a, b in out if a in present and b in present]


def verdict(diff, p_diff, p_equiv, model_diffs=(), alpha=ALPHA, margin=MARGIN) -> str:
    """The verdict of one claim from its (adjusted) p-values and each model's difference (module docstring)."""
    if diff is None or p_diff is None:
        return "inconclusive"
    if p_diff < alpha and diff != 0:
        if all(np.sign(d) == np.sign(diff) for d in model_diffs):
            return "supported" if diff > 0 else "contradicted"
        return "models disagree"
    if p_equiv is not None and p_equiv < alpha and all(abs(d) < margin for d in model_diffs):
        return "equivalent"
    return "inconclusive"


def _finer(names, a, b, labels, preds, fine):
    """Descriptive pooled differences (a - b) of the finer measures, each with its cluster-bootstrap 95% CI."""
    valid = labels >= 0
    base = {m: preds[BASELINE.key(m)][valid] for m in names}
    per_image = {
        "agreement": [100.0 * ((preds[a.key(m)][valid] == base[m]).astype(float) - (preds[b.key(m)][valid] == base[m]))
                      for m in names],
        "kl": [fine[a.key(m)][0][valid] - fine[b.key(m)][0][valid] for m in names],
        "cls_deviation": [fine[a.key(m)][1][valid] - fine[b.key(m)][1][valid] for m in names],
    }
    out = {}
    for k, rows in per_image.items():
        d = np.mean(rows, axis=0)
        low, high, _ = cluster_bootstrap(d)
        out[k] = {"diff": float(np.mean(d)), "ci_low": low, "ci_high": high}
    return out


def _record(claim, a, b, names, labels, preds, fine):
    """The claim's pooled statistics and each model's (p-values not yet adjusted)."""
    ca, _ = correct(preds, labels, names, a)
    cb, _ = correct(preds, labels, names, b)
    rec = {"claim": claim, "rate": a.point, "a": a.label, "b": b.label, **compare(ca, cb)}
    rec["models"] = [{"model": m, **{k: v for k, v in compare(ca[i:i + 1], cb[i:i + 1]).items()
                                     if k in ("diff", "ci_low", "ci_high", "p_diff", "p_equiv")}}
                     for i, m in enumerate(names)] if len(names) > 1 else []
    if a.method == "stm" and b.method == "stm":
        rec["finer"] = _finer(names, a, b, labels, preds, fine)
    return rec


def _adjust(records, names):
    """Holm over the pooled family, and over each model's family; then the verdicts."""
    adj = holm([r["p_diff"] for r in records] + [r["p_equiv"] for r in records])
    for r, pd, pe in zip(records, adj[:len(records)], adj[len(records):]):
        r["p_diff_holm"], r["p_equiv_holm"] = float(pd), float(pe)
    for i in range(len(names) if records and records[0]["models"] else 0):
        rows = [r["models"][i] for r in records]
        madj = holm([m["p_diff"] for m in rows] + [m["p_equiv"] for m in rows])
        for m, pd, pe in zip(rows, madj[:len(rows)], madj[len(rows):]):
            m["p_diff_holm"], m["p_equiv_holm"] = float(pd), float(pe)
            m["verdict"] = verdict(m["diff"], m["p_diff_holm"], m["p_equiv_holm"])
    for r in records:
        r["verdict"] = verdict(r["diff"], r["p_diff_holm"], r["p_equiv_holm"], [m["diff"] for m in r["models"]])


def claims(model_names, exps, labels, preds, fine, stm_options, achieved, depth):
    """Claim records (module docstring) from per-image predictions {key: array}, labels, the finer measures
    {key: (kl, deviation)} and {experiment: achieved rate}; ``depth`` of the models (the late-merges control)."""
    records = [_record(c, a, b, model_names, labels, preds, fine)
               for c, a, b in claim_pairs(exps, dict(stm_options), achieved, depth)]
    _adjust(records, model_names)
    return records


def _num(v, fmt):
    """v in ``fmt``, without a sign on a rounded zero (-0.00)."""
    if fmt.endswith("f"):
        v = round(v, int(fmt[-2])) + 0.0
    return f"{v:{fmt}}"


def _fmt_p(p):
    return "< 1e-4" if p < 1e-4 else f"{p:.2g}"


def claims_text(records, n_models):
    """The "Claims" section printed after the table."""
    if not records:
        return ""
    lines = [f"Claims (a - b in top-1 points over {n_models} model(s) x {records[0]['n_images']} images, the same "
             f"images for every row: 95% cluster-bootstrap interval by image; p: sign-flip test of no difference; "
             f"TOST: equivalence within ±{MARGIN:g} point; both Holm-adjusted over the {2 * len(records)} tests "
             f"here; the adjusted tests decide the verdict):"]
    for r in records:
        rate = f"{100 * r['rate']:.0f}%" if isinstance(r["rate"], float) else str(r["rate"])
        per = " / ".join(f"{m['diff']:+.1f}" for m in r["models"])
        line = (f"- {r['claim']} at {rate}: {r['diff']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}], "
                f"p {_fmt_p(r['p_diff_holm'])}, TOST p {_fmt_p(r['p_equiv_holm'])}: {r['verdict']}")
        if per:
            line += f" (per model {per})"
        if r.get("finer"):
            f = r["finer"]
            line += "; finer: " + ", ".join(
                f"{name} {_num(f[k]['diff'], fmt)} [{_num(f[k]['ci_low'], fmt)}, {_num(f[k]['ci_high'], fmt)}]"
                for k, name, fmt in (("agreement", "agreement", "+.2f"), ("kl", "KL", "+.1e"),
                                     ("cls_deviation", "class-token deviation", "+.1e")))
        lines.append(line)
    return "\n".join(lines)
