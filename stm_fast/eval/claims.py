"""The paper's claims as paired comparisons on the run's own images, with verdicts at two levels (``claims.json``;
docs/eval.md § Claims and statistics).

For each rate (or schedule) of the run, the pairs (a, b) the grid makes possible, each in a **family**
fixed by its kind, never by what else the run holds:

* ``HSP weights``: ``HSP vs plain average`` (STM's lsq weights vs ``weights="avg"``), ``HSP vs drop``,
  ``HSP vs size-weighted average`` (ToMe's merge), ``joint fit vs HSP`` (``lsq_joint`` vs lsq);
* ``positions``: ``HSP vs plain average`` with uniform positions, and with merges in the second half only,
  where merged tokens sit nearer the class token;
* ``sides``: ``both sides vs one side``;
* ``peer: <label>``: ``STM vs <peer>``, one family per peer group (its flavours and its run at STM's own
  layers and counts are groups of their own);
* ``flavour: <method> <flavour>``: ``<peer> <flavour> flavour vs paper``.

**These networks** (image level): each network's exact McNemar test of no difference and exact TOST of
equivalence (``paired_stats``), Holm-adjusted within the claim's family for that network, give that
network's verdict; the networks' verdict is an intersection-union test: ``supported`` / ``contradicted`` /
``equivalent`` only when every network's own adjusted test says so (``networks disagree`` when some are
supported and some contradicted). The pooled difference and its cluster-bootstrap interval by image
describe the size. **The method** (seed level): the networks are independently trained seeds; a t-test and
two one-sided t-tests over their differences, Holm-adjusted within the family, decide the verdict about
the method. The README states only these.

**Margin**: ``RELATIVE_MARGIN`` (10%) of a's own top-1 loss from the unreduced model, pooled over the
networks: a difference smaller than a tenth of what the reduction costs is negligible (docs/eval.md says
why). The absolute ±1 point TOST is reported beside it (``p_equiv_1pt``), without a verdict.

**Controls** (HSP and positions claims): the positive control replaces each merged token by seeded noise
of its own scale (``weights="noise"``, same positions). When HSP's difference from that control lies inside
the margin, merging and destroying the merged tokens cannot be told apart here, and an ``equivalent``
verdict reads ``not testable here``. ``recovered``: the share of drop's loss that HSP recovers, on top-1,
the KL divergence from the unreduced model and the class feature's deviation from it.
"""

from __future__ import annotations

import numpy as np

from ..reduction import STM_DEFAULTS
from .experiment import BASELINE, Experiment
from .groups import group_claim_pairs
from .paired_stats import ALPHA, MARGIN, RELATIVE_MARGIN, cluster_bootstrap, compare, exact_equivalence_test, holm, \
    seed_level
from .predictions import correct

__all__ = ["claims", "claims_text", "verdict", "claim_pairs", "family_of", "combine_networks"]

NOT_TESTABLE = "not testable here"


def family_of(claim: str) -> str:
    """The claim's family (module docstring), from its kind alone."""
    if claim.startswith("HSP vs plain average,"):
        return "positions"
    if claim.startswith("HSP vs") or claim == "joint fit vs HSP":
        return "HSP weights"
    if claim == "both sides vs one side":
        return "sides"
    if claim.startswith("STM vs "):
        return "peer: " + claim[len("STM vs "):]
    return "flavour: " + claim.replace(" flavour vs paper", "")


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


def claim_pairs(exps, stm_options, achieved, depth):
    """[(claim, experiment a, experiment b)] with both experiments in ``exps``."""
    present, out = set(exps), []
    points = list(dict.fromkeys(e.point for e in exps if e.method != "none"))
    for point in points:
        base = next((e for e in exps if e.method == "stm" and e.opts == stm_options and e.point == point), None)
        if base is not None:
            out += group_claim_pairs(base, stm_options, depth)
        peers = [e for e in exps if e.method not in ("none", "stm") and e.point == point]
        stm = _stm_at(point, stm_options, achieved, exps)
        if stm is not None:
            out += [(f"STM vs {e.label}", stm, e) for e in peers]
        for e in peers:
            paper = Experiment.of(e.method, e.rate, e.schedule_value)
            if e.opts.get("flavour"):
                out.append((f"{e.method} {e.opts['flavour']} flavour vs paper", e, paper))
    return [(c, a, b) for c, a, b in out if a in present and b in present]


def verdict(diff, p_diff, p_equiv, alpha=ALPHA) -> str:
    """One network's (or the method's) verdict from its adjusted p-values: a significant difference decides
    by its sign, else a significant equivalence, else inconclusive."""
    if diff is None or p_diff is None:
        return "inconclusive"
    if p_diff < alpha and diff != 0:
        return "supported" if diff > 0 else "contradicted"
    if p_equiv is not None and p_equiv < alpha:
        return "equivalent"
    return "inconclusive"


def combine_networks(verdicts) -> str:
    """The intersection-union verdict of several networks: theirs when all agree, ``networks disagree`` when
    some are supported and others contradicted, else inconclusive."""
    v = set(verdicts)
    if len(v) == 1:
        return v.pop()
    return "networks disagree" if {"supported", "contradicted"} <= v else "inconclusive"


def _accuracy(preds, labels, names, e):
    c, _ = correct(preds, labels, names, e)
    return 100.0 * c.mean(axis=1)


def _per_image(names, e, labels, preds, fine):
    """Per-image measures of experiment e against the baseline, mean over networks: top-1 loss, KL, deviation."""
    valid = labels >= 0
    loss = np.mean([100.0 * ((preds[BASELINE.key(m)][valid] == labels[valid]).astype(float)
                             - (preds[e.key(m)][valid] == labels[valid])) for m in names], axis=0)
    return {"top1": loss, "kl": np.mean([fine[e.key(m)][0][valid] for m in names], axis=0),
            "deviation": np.mean([fine[e.key(m)][1][valid] for m in names], axis=0)}


def _recovered(names, a, drop, labels, preds, fine):
    """Share of drop's loss (top-1 points, KL, class-feature deviation from the unreduced model) that a recovers."""
    ma, md = _per_image(names, a, labels, preds, fine), _per_image(names, drop, labels, preds, fine)
    out = {}
    for k in ("top1", "kl", "deviation"):
        lost = float(md[k].mean())
        out[k] = None if lost <= 0 else float((lost - ma[k].mean()) / lost)
    return out
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


def _control(names, a, labels, preds, margin, present):
    """The positive control of an HSP claim whose a is ``a``: a's difference from the same settings with every
    merged token replaced by noise (pooled, points), and whether it lies outside the margin (None: not run)."""
    noise = a.with_options(weights="noise")
    if a.method != "stm" or noise not in present:
        return None
    diff = float(np.mean(_accuracy(preds, labels, names, a) - _accuracy(preds, labels, names, noise)))
    return {"b": noise.label, "diff": diff, "testable": abs(diff) >= margin}


def _record(claim, a, b, names, labels, preds, fine, present):
    """The claim's statistics: pooled description, each network's exact tests, the method's seed-level ones,
    its margin, controls and finer measures (p-values not yet adjusted)."""
    ca, _ = correct(preds, labels, names, a)
    cb, _ = correct(preds, labels, names, b)
    loss = float(np.mean(_accuracy(preds, labels, names, BASELINE) - _accuracy(preds, labels, names, a)))
    margin = RELATIVE_MARGIN * max(loss, 0.0)
    rec = {"claim": claim, "family": family_of(claim), "rate": a.point, "a": a.label, "b": b.label,
           "margin": margin, "a_loss": loss, **compare(ca, cb, margin=margin)}
    for m in rec["per_model"]:
        m["p_equiv_1pt"] = exact_equivalence_test(m["n_plus"], m["n_minus"], rec["n_images"], MARGIN)
    for m, name in zip(rec["per_model"], names):
        m["model"] = name
    rec["method"] = seed_level([m["diff"] for m in rec["per_model"]], margin)
    if a.method == "stm" and b.method == "stm":
        rec["finer"] = _finer(names, a, b, labels, preds, fine)
    if rec["family"] in ("HSP weights", "positions"):  # claims about what a merge keeps: their controls
        rec["control"] = _control(names, a, labels, preds, margin, present)
        drop = a.with_options(weights="drop")
        rec["recovered"] = _recovered(names, a, drop, labels, preds, fine) if drop in present and drop != a else None
    return rec


def _holm_pairs(rows, p_diff="p_diff", p_equiv="p_equiv"):
    """Holm over the difference and equivalence p-values of ``rows`` together; writes the *_holm keys."""
    adj = holm([r[p_diff] for r in rows] + [r[p_equiv] for r in rows])
    for r, pd, pe in zip(rows, adj[:len(rows)], adj[len(rows):]):
        r[p_diff + "_holm"] = None if np.isnan(pd) else float(pd)
        r[p_equiv + "_holm"] = None if np.isnan(pe) else float(pe)


def _testable(verdict_, control):
    return NOT_TESTABLE if verdict_ == "equivalent" and control is not None and not control["testable"] else verdict_


def _adjust(records):
    """Holm within each family (per network, and at the method level), then the verdicts of each network,
    of these networks together (intersection-union) and of the method."""
    for fam in dict.fromkeys(r["family"] for r in records):
        rows = [r for r in records if r["family"] == fam]
        for i in range(rows[0]["n_models"] if rows[0]["per_model"] else 0):
            _holm_pairs([r["per_model"][i] for r in rows])
        _holm_pairs([r["method"] for r in rows])
    for r in records:
        ctl = r.get("control")
        for m in r["per_model"]:
            m["verdict"] = _testable(verdict(m["diff"], m["p_diff_holm"], m["p_equiv_holm"]), ctl)
        r["verdict"] = combine_networks([m["verdict"] for m in r["per_model"]]) if r["per_model"] else "inconclusive"
        meth = r["method"]
        meth["verdict"] = _testable(verdict(meth["diff"], meth["p_diff_holm"], meth["p_equiv_holm"]), ctl)


def claims(model_names, exps, labels, preds, fine, stm_options, achieved, depth):
    """Claim records (module docstring) from per-image predictions {key: array}, labels, the finer measures
    {key: (kl, deviation)} and {experiment: achieved rate}; ``depth`` of the models (the late-merges control)."""
    present = set(exps)
    records = [_record(c, a, b, model_names, labels, preds, fine, present)
               for c, a, b in claim_pairs(exps, dict(stm_options), achieved, depth)]
    _adjust(records)
    return records


def _num(v, fmt):
    """v in ``fmt``, without a sign on a rounded zero (-0.00)."""
    if fmt.endswith("f"):
        v = round(v, int(fmt[-2])) + 0.0
    return f"{v:{fmt}}"


def _fmt_p(p):
    return "< 1e-4" if p < 1e-4 else f"{p:.2g}"


def _interval(lo, hi, fmt="+.2f"):
    return "[n/a]" if lo is None else f"[{_num(lo, fmt)}, {_num(hi, fmt)}]"


def _control_text(r):
    parts = []
    c = r.get("control")
    if c is not None:
        parts.append(f"control: HSP vs noise at the merge site {c['diff']:+.2f}"
                     + ("" if c["testable"] else " (inside the margin: not testable here)"))
    rec = r.get("recovered")
    if rec:
        parts.append("recovers of drop's loss: " + ", ".join(
            f"{name} {'n/a' if rec[k] is None else f'{100 * rec[k]:.0f}%'}"
            for k, name in (("top1", "top-1"), ("kl", "KL"), ("deviation", "class-feature deviation"))))
    return "; ".join(parts)


def claim_line(r) -> str:
    """One claim as the Claims section prints it."""
    rate = f"{100 * r['rate']:.0f}%" if isinstance(r["rate"], float) else str(r["rate"])
    meth = r["method"]
    per = " / ".join(f"{m['diff']:+.1f} {m['verdict']}" for m in r["per_model"])
    line = (f"- {r['claim']} at {rate} [{r['family']}]: {r['diff']:+.2f} {_interval(r['ci_low'], r['ci_high'])} "
            f"(margin ±{r['margin']:.2f} = 10% of a's {r['a_loss']:.2f}-point loss); networks: {per} -> these "
            f"networks: {r['verdict']}; the method ({meth['n_seeds']} seeds): {meth['diff']:+.2f} "
            f"{_interval(meth['ci_low'], meth['ci_high'])}, t-test p "
            f"{'n/a' if meth['p_diff_holm'] is None else _fmt_p(meth['p_diff_holm'])}, TOST p "
            f"{'n/a' if meth['p_equiv_holm'] is None else _fmt_p(meth['p_equiv_holm'])}: {meth['verdict']}")
    extra = _control_text(r)
    if extra:
        line += "; " + extra
    if r.get("finer"):
        f = r["finer"]
        line += "; finer: " + ", ".join(
            f"{name} {_num(f[k]['diff'], fmt)} {_interval(f[k]['ci_low'], f[k]['ci_high'], fmt)}"
            for k, name, fmt in (("agreement", "agreement", "+.2f"), ("kl", "KL", "+.1e"),
                                 ("cls_deviation", "class-token deviation", "+.1e")))
    return line


def claims_text(records, n_models):
    """The "Claims" section printed after the table."""
    if not records:
        return ""
    fams = list(dict.fromkeys(r["family"] for r in records))
    lines = [f"Claims (a - b in top-1 points, {n_models} network(s) x {records[0]['n_images']} images, the same images "
             f"for every row; pooled difference with its 95% cluster-bootstrap interval by image (descriptive). "
             f"These networks: each network's exact McNemar test and exact TOST at the margin, Holm-adjusted within "
             f"the claim's family, combined by intersection-union. The method: t-test and TOST over the networks' "
             f"differences (independently trained seeds), Holm-adjusted within the family. {len(fams)} families: "
             f"{', '.join(fams)}):"]
    lines += [claim_line(r) for r in records]
    return "\n".join(lines)
