"""The method groups of ``--methods``, one registry entry each: what a group runs and which claims it adds.

A ``Group`` yields its experiments at one grid point (a rate, or the run's schedule) and, given STM's
experiment at that point, the claim pairs it makes testable (docs/eval.md § Claims). Every registered
reduction method other than ``stm`` and every flavour gets its own group, derived from the method registry
(``stm_fast.reduction.METHODS``): a new method needs no line here. STM's ablations and controls, and the
peers run at STM's own layers, are the groups written out below. ``default`` says whether the eval's
default grid runs the group (a method's ``default_eval``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from stm_ref.merge import TOKEN_WEIGHT_VARIANTS

from ..reduction import METHODS, STM_DEFAULTS, make_reduction
from .experiment import Experiment

__all__ = ["Group", "Point", "GROUPS", "DEFAULT_GROUPS", "MATCHED_PEERS", "late_start", "group_claim_pairs"]


@dataclass(frozen=True)
class Point:
    """One point of the grid: a requested rate or the run's schedule, STM's options, the models' config."""

    rate: float | None
    schedule: object
    stm_options: dict
    cfg: object

    def reduction(self, method, **options):
        """The ``Reduction`` of ``method`` with ``options`` at this point (ValueError/TypeError if it cannot run)."""
        return make_reduction(self.cfg, method, rate=None if self.schedule is not None else self.rate,
                              schedule=self.schedule, **options)

    def feasible(self, method, **options) -> str | None:
        """None if ``method`` with ``options`` can run at this point, else why not (one line)."""
        try:
            self.reduction(method, **options)
        except (ValueError, TypeError) as err:
            return str(err)
        return None

    def stm(self, **changes) -> Experiment:
        return Experiment.of("stm", self.rate, self.schedule, {**self.stm_options, **changes})


def _no_claims(base, stm_options, depth):
    return []


@dataclass(frozen=True, kw_only=True)
class Group:
    """One ``--methods`` group: ``experiments(point) -> (experiments, notes)`` (a note for each experiment
    left out, e.g. a control that cannot reach the rate); ``claims(base, stm_options, depth) -> [(claim, a,
    b)]`` given STM's experiment ``base`` at a point; ``default``: in the default grid."""

    name: str
    doc: str
    experiments: Callable[[Point], tuple]
    claims: Callable = _no_claims
    default: bool = True


def late_start(depth: int) -> int:
    """The first merging layer of the late-merges control: the second half of the network."""
    return depth // 2


_HSP_PAIRS = (("avg", "HSP vs plain average"), ("drop", "HSP vs drop"), ("size", "HSP vs size-weighted average"))


def _weights(point):
    default = point.stm_options.get("weights", STM_DEFAULTS["weights"])
    return [point.stm(weights=w) for w in TOKEN_WEIGHT_VARIANTS if w != default], []


def _weights_claims(base, stm_options, depth):
    """HSP against each simpler rule, and the joint fit against HSP (family "HSP weights")."""
    w = stm_options.get("weights", STM_DEFAULTS["weights"])
    out = [(claim, base, base.with_options(weights=v)) for v, claim in _HSP_PAIRS if w != v]
    if w != "lsq_joint":
        out.append(("joint fit vs HSP", base.with_options(weights="lsq_joint"), base))
    return out


def _one_side(point):
    side = "right" if point.stm_options.get("sides", STM_DEFAULTS["sides"]) == "right" else "left"
    return [point.stm(sides=side)], []


def _sides_claims(base, stm_options, depth):
    if stm_options.get("sides", "both") != "both":
        return []
    return [("both sides vs one side", base, base.with_options(sides="left"))]


def _controls(point):
    """HSP against the plain average where merged tokens sit nearer the class token: uniform positions, and
    merges in the second half only, each with its noise control (left out, with a note, where that cannot
    reach the rate)."""
    out, notes = [], []
    for change in (dict(positions="uniform"), dict(start_layer=late_start(point.cfg.depth))):
        trio = [point.stm(**change, weights=w) for w in ("lsq", "avg", "noise")]
        why = point.feasible("stm", **{**point.stm_options, **change})
        if why is None:
            out += trio
        else:
            notes.append(f"{trio[0].cli} left out of stm-controls: {why}")
    return out, notes


def _controls_claims(base, stm_options, depth):
    uniform = base.with_options(positions="uniform")
    late = base.with_options(start_layer=late_start(depth))
    return [("HSP vs plain average, uniform positions", uniform, uniform.with_options(weights="avg")),
            (f"HSP vs plain average, merges after layer {late_start(depth)} only", late, late.with_options(weights="avg"))]


MATCHED_PEERS = tuple(n for n, cls in METHODS.items() if n != "stm" and cls.default_eval and "layers" in cls.defaults)


def _matched(point):
    """Each peer of ``MATCHED_PEERS`` (the default grid's peers that reduce after any layers by any counts) at
    STM's layers and per-layer counts: the same 'when', another 'how'."""
    stm = point.reduction("stm", **point.stm_options)
    layers = [i for i, k in enumerate(stm.schedule) if k]
    return [Experiment.of(p, point.rate, list(stm.schedule), {"layers": layers}, note="at STM's layers and counts")
            for p in MATCHED_PEERS], []


def _method_group(name, cls):
    return Group(name=name, doc=f"{name} at each rate", default=cls.default_eval,
                 experiments=lambda point: ([Experiment.of(name, point.rate, point.schedule)], []))


def _flavour_group(name, flavour, cls):
    """A released rule may not express every rate: the experiment is left out with a note where it cannot."""
    def experiments(point):
        e = Experiment.of(name, point.rate, point.schedule, {"flavour": flavour})
        why = point.feasible(name, flavour=flavour)
        return ([e], []) if why is None else ([], [f"{e.cli} left out of {name}-{flavour}: {why}"])

    return Group(name=f"{name}-{flavour}", doc=f"{name} as its authors released it (flavour={flavour})", default=cls.default_eval,
                 experiments=experiments)


def _registry():
    groups = [Group(name="none", doc="the baseline alone (always run first)", experiments=lambda point: ([], [])),
              Group(name="stm", doc="STM with the run's options",
                    experiments=lambda point: ([point.stm()], [])),
              Group(name="stm-oneside", doc="STM merging on one side", experiments=_one_side, claims=_sides_claims),
              Group(name="stm-weights", doc="STM with every other weight rule", experiments=_weights,
                    claims=_weights_claims),
              Group(name="stm-controls", doc="uniform positions and late merges, each with its noise control",
                    experiments=_controls, claims=_controls_claims)]
    groups += [_method_group(n, cls) for n, cls in METHODS.items() if n != "stm"]
    groups += [_flavour_group(n, f, fl) for n, cls in METHODS.items() for f, fl in cls.flavours.items()]
    groups.append(Group(name="peers-matched", doc="the peers at STM's layers and counts", experiments=_matched))
    return {g.name: g for g in groups}


GROUPS = _registry()
DEFAULT_GROUPS = tuple(name for name, g in GROUPS.items() if g.default and name != "none")


def group_claim_pairs(base, stm_options, depth):
    """The claim pairs every group adds for STM's experiment ``base`` (those whose experiments ran are kept
    by the caller)."""
    return [pair for g in GROUPS.values() for pair in g.claims(base, stm_options, depth)]
