"""One configuration of an eval run, as a value: ``Experiment`` (method, rate or schedule, options) and ``BASELINE``.

Its spellings, each defined once here: ``key(model)`` (the progress and prediction files' key), ``label``
(tables and claims), ``cli`` (error messages: how the user would ask for it) and ``to_json`` /
``from_json`` (``run.json``). ``note`` says why an experiment exists when its options alone do not (a peer
run at STM's schedule); it is part of the value and of its label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

__all__ = ["Experiment", "BASELINE", "describe"]


def _frozen(v):
    """A hashable copy of a JSON-like value (lists become tuples, dicts sorted item tuples)."""
    if isinstance(v, dict):
        return tuple(sorted((k, _frozen(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_frozen(x) for x in v)
    return v


def _thawed(v):
    return [_thawed(x) for x in v] if isinstance(v, tuple) else v


def describe(method: str, options: dict) -> str:
    """'stm (both sides, lsq weights)' / 'tome (layers=all)': how a configuration is named in claims and tables."""
    from ..reduction import STM_DEFAULTS

    if method == "none":
        return "baseline (no reduction)"
    if method != "stm":
        extra = ", ".join(f"{k}={v}" for k, v in options.items())
        return f"{method} ({extra})" if extra else method
    o = {**STM_DEFAULTS, **options}
    sides = "both sides" if o["sides"] == "both" else f"one side ({o['sides']})"
    weights = f"{o['weights']} weights"
    extra = [f"{k}={o[k]}" for k in ("positions", "start_layer") if o[k] != STM_DEFAULTS[k]]
    return f"stm ({', '.join([sides, weights, *extra])})"


@dataclass(frozen=True)
class Experiment:
    """What one row of the table evaluates: ``method`` (a registered reduction, or "none"), the requested
    ``rate`` (fraction) or ``schedule`` (tokens removed after each layer in total; docs/conventions.md §6;
    an int means every layer), the method's ``options`` (held as sorted item tuples) and a ``note``."""

    method: str
    rate: float | None = None
    schedule: int | tuple | None = None
    options: tuple = field(default=())
    note: str = ""

    @classmethod
    def of(cls, method, rate=None, schedule=None, options=None, note="") -> Experiment:
        return cls(method, rate, _frozen(schedule), _frozen(options or {}), note)

    @property
    def opts(self) -> dict:
        """The options as a dict (lists where the JSON form has lists)."""
        return {k: _thawed(v) for k, v in self.options}

    @property
    def schedule_value(self):
        return _thawed(self.schedule)

    @property
    def point(self):
        """The rate (a float) or 'schedule S': where this experiment sits on the rate axis. An experiment
        with both (a peer at STM's schedule for a rate) sits at the rate."""
        return self.rate if self.rate is not None else f"schedule {self.schedule_value}"

    @property
    def label(self) -> str:
        """The table's and the claims' name; a peer at STM's schedule shows the note, not its layer list."""
        opts = {k: v for k, v in self.opts.items() if not (self.note and k == "layers")}
        base = describe(self.method, opts)
        return f"{base}{', ' if self.method == 'stm' else ' '}{self.note}" if self.note else base

    @property
    def cli(self) -> str:
        """'stm (sides=left) at --rates 0.2': as the user asked for it (defaults left out)."""
        from ..reduction import METHODS

        defaults = METHODS[self.method].defaults if self.method in METHODS else {}
        extra = [f"{k}={v}" for k, v in self.opts.items() if defaults.get(k, object()) != v]
        where = f"--schedule {self.schedule_value}" if self.schedule is not None else f"--rates {self.rate}"
        return f"{self.method}{' (' + ', '.join(extra) + ')' if extra else ''} at {where}"

    def to_json(self) -> list:
        out = [self.method, self.rate, self.schedule_value, self.opts]
        return out + [self.note] if self.note else out

    @classmethod
    def from_json(cls, item) -> Experiment:
        method, rate, schedule, options, *note = item
        return cls.of(method, rate, schedule, options, note[0] if note else "")

    def key(self, model: str) -> str:
        """The key of (model, this experiment) in progress and prediction files."""
        return json.dumps([model, *self.to_json()], sort_keys=True)

    def with_options(self, **changes) -> Experiment:
        return Experiment.of(self.method, self.rate, self.schedule_value, {**self.opts, **changes}, self.note)


BASELINE = Experiment("none", 0.0)
