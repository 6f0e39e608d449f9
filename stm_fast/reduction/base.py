"""The parts every reduction method shares: the ``Method`` interface, the method registry, the immutable
``Reduction`` value a model holds, and the ``ReductionPass`` that runs it inside one forward.

A method reduces the stream x = residual + mixer output between two layers (docs/conventions.md §5).
The model's layer loop (``stm_fast.vim.VisionMamba.forward_features``) consults the installed
``Reduction`` only through ``begin`` and the ``ReductionPass`` it returns (the interfaces
``stm_fast.vim.TokenReduction`` / ``ReductionPass``); nothing here is stored on the model's modules.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Mapping

import torch

from ..runtime import compute_dtype
from ..layer_stats import LayerStats, StatsRequest
from .schedule import solve_schedule
from .tokens import TokenState

__all__ = ["Method", "PruningMethod", "METHODS", "register_method", "register_flavour", "Reduction", "ReductionPass", "StepHook", "check_layers",
           "default_prune_layers"]

# hook(step, args) -> step(*args): wraps every reduction step, args = (i, k, x, tokens, stats); e.g. a timer
StepHook = Callable[[Callable[..., Any], tuple], Any]


class Method:
    """A token-reduction method with its options fixed: where it may reduce, how much one step can take,
    what a step costs, and the step itself. Subclasses set ``name`` and ``defaults`` (every option with
    its default value) and register with ``@register_method``."""

    name: ClassVar[str] = "?"
    defaults: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    flavours: ClassVar[dict[str, type]] = {}  # named variants of the method (``register_flavour``)
    default_eval: ClassVar[bool] = True  # whether ``python -m stm_fast.eval``'s default grid runs it
    step_unit = 1  # tokens per unit of a step (2 when a step removes the same number on two sides)

    def __init__(self, cfg, **options: Any):
        bad = sorted(set(options) - set(self.defaults))
        if bad:
            raise TypeError(f"reduce(..., '{self.name}'): unknown option(s) {bad}; allowed: {', '.join(sorted(self.defaults))}")
        self.cfg = cfg
        given = {**self.defaults, **options}
        for k, v in given.items():  # a boolean option takes True or False, never a truthy string
            if isinstance(self.defaults[k], bool) and not isinstance(v, bool):
                raise ValueError(f"{self.name}: {k} must be True or False, got {v!r}")
        self.options = MappingProxyType(self.resolve_options(cfg, given))  # frozen from here on

    def resolve_options(self, cfg, options: dict) -> dict:
        """The options as this method runs them (e.g. a default layer list filled in); a new dict."""
        return dict(options)

    @classmethod
    def example_options(cls, depth: int) -> list[dict]:
        """Option sets that together reach every choice of this method on a model of ``depth`` layers, for
        property tests and the certification (a flavour's include its ``flavour``)."""
        return [{}]

    def reduction_points(self) -> list[int]:
        """The layers after which this method may reduce (0-based, ascending)."""
        return list(range(self.cfg.depth - 1))

    def solve(self, rate: float) -> tuple[list[int], dict]:
        """(the schedule meeting ``rate`` within ±1 point, docs/conventions.md §6; the options that solving
        fixed, e.g. a released rule's parameter, to be given back to a new instance: nothing is written
        here). ValueError if no schedule can."""
        return solve_schedule(self.cfg.depth, self.cfg.num_tokens, rate, self.reduction_points(), self.step_unit,
                              self.token_budget(), self.max_per_step), {}

    def default_schedule(self) -> list[int] | None:
        """The schedule the options alone fix (a flavour's released rule), or None: a rate or schedule is needed."""
        return None

    def example_schedule(self, units: int = 1) -> list[int] | None:
        """A feasible schedule for tests: ``units`` step units after every layer it may reduce at, within the
        per-step limit and the token budget; None where the options fix the schedule (``default_schedule``)."""
        if self.default_schedule() is not None:
            return None
        out, L, left = [0] * (self.cfg.depth - 1), self.cfg.num_tokens, self.token_budget()
        for i in self.reduction_points():
            k = min(units * self.step_unit, self.max_per_step(L), L if left is None else left)
            k -= k % self.step_unit
            out[i], L, left = k, L - k, None if left is None else left - k
        return out

    def token_budget(self) -> int | None:
        """The most tokens this method can remove in total (None: no limit beyond the per-step one)."""
        return self.cfg.num_patches - 1

    def max_per_step(self, L: int) -> int:
        """Most tokens one step can remove from L (the class token and one other token always stay)."""
        return L - 2

    def overhead_flops(self, L: int, k: int) -> int:
        """Multiply-adds of one step removing k of L tokens (selection + merge), per image."""
        return 0

    def stats_request(self, k: int) -> StatsRequest | None:
        """What the layer before a k-token step must export (None: no statistics)."""
        return StatsRequest()

    def decay_scales(self, tokens: TokenState) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-direction decay scales (batch, L) for the next layer, or None (no alignment)."""
        return None

    def step(self, i: int, k: int, x: torch.Tensor, tokens: TokenState, stats: LayerStats | None):
        """Reduce the stream x (batch, L, d) after layer i by k tokens: returns (x', tokens')."""
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}


def register_flavour(cls: type[Method]) -> type[Method]:
    """Class decorator: ``cls`` (with ``name`` = its method and ``flavour`` = its name) becomes
    ``reduce(..., name, flavour=flavour)``; the method itself stays the paper's version."""
    base = METHODS[cls.name]
    base.flavours = {**base.flavours, cls.flavour: cls}
    return cls


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available to ``stm_fast.reduce`` under ``cls.name``."""
    if cls.name in METHODS or cls.name == "none":
        raise ValueError(f"a reduction method named {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    return cls


@dataclass(frozen=True, kw_only=True)
class Reduction:
    """One token reduction, as a value: the method and its options, the schedule (tokens removed after each
    layer, in total; docs/conventions.md §6), tokens entering each layer, the achieved and requested rates
    and each step's own cost. ``stm_fast.reduce`` installs it as the model's ``reduction``; equal values
    reduce identically. ``step_hook`` (not part of the value) wraps every step, e.g. to time it."""

    method: str
    options: Mapping[str, Any]
    schedule: tuple[int, ...]
    tokens_per_layer: tuple[int, ...]
    rate: float
    requested_rate: float | None
    overhead_flops_per_layer: tuple[int, ...]
    impl: Method | None = field(default=None, compare=False, repr=False)
    step_hook: StepHook | None = field(default=None, compare=False, repr=False)

    @property
    def active(self) -> bool:
        """Whether any step removes a token (an inactive reduction runs the plain model, bitwise)."""
        return any(self.schedule)

    def begin(self, hidden: torch.Tensor) -> ReductionPass | None:
        """The pass of one forward; None (the plain loop) when nothing is removed or the batch is empty
        (an empty batch gives an empty result, whatever the method)."""
        return ReductionPass(self, hidden) if self.active and hidden.shape[0] > 0 else None

    def with_step_hook(self, hook: StepHook | None) -> Reduction:
        return replace(self, step_hook=hook)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record of the value (what results files and ``stm_ref.vim.forward`` read)."""
        return {"method": self.method, "options": dict(self.options), "schedule": list(self.schedule),
                "tokens_per_layer": list(self.tokens_per_layer), "rate": self.rate,
                "requested_rate": self.requested_rate, "overhead_flops_per_layer": list(self.overhead_flops_per_layer)}


class ReductionPass:
    """A ``Reduction`` inside one forward: the per-image ``TokenState`` and the calls into the method."""

    def __init__(self, reduction: Reduction, hidden: torch.Tensor):
        self.reduction, self.impl = reduction, reduction.impl
        batch, L, _ = hidden.shape
        self.tokens = TokenState.start(batch, L, self.impl.cfg.cls_position, hidden.device, compute_dtype(hidden))

    def _k(self, i):
        schedule = self.reduction.schedule
        return schedule[i] if i < len(schedule) else 0

    def layer_inputs(self, i: int):
        k = self._k(i)
        with torch.autocast(self.tokens.pos.device.type, enabled=False):  # decay scales in float32 under AMP too
            scales = self.impl.decay_scales(self.tokens)
        return scales, (self.impl.stats_request(k) if k else None)

    def reduces_after(self, i: int) -> bool:
        return self._k(i) > 0

    def reduce(self, i: int, x: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
        """The step after layer i, computed in float32 (float64 for a float64 model) whatever the forward's
        autocast: under AMP, matrix products would otherwise run in bf16/fp16, changing STM's weights and
        breaking near-ties in similarity-based selections (docs/conventions.md §10). Returns x's dtype."""
        ct = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            stats = None if stats is None else stats.in_dtype(ct)
            args, hook = (i, self._k(i), x.to(ct), self.tokens, stats), self.reduction.step_hook
            out, self.tokens = self.impl.step(*args) if hook is None else hook(self.impl.step, args)
        return out.to(x.dtype)

    def class_rows(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens.class_rows(x)


class PruningMethod(Method):
    """A method that reduces after a ``layers`` option (default: ToP-ViM's, ``default_prune_layers``)."""

    def resolve_options(self, cfg, options):
        return {**options, "layers": default_prune_layers(cfg.depth) if options["layers"] is None else options["layers"]}

    def reduction_points(self) -> list[int]:
        return check_layers(self.name, self.options["layers"], self.cfg.depth)


def check_layers(method: str, layers, depth: int) -> list[int]:
    """Layer indices after which ``method`` reduces, sorted, each an integer in 0..depth-2 (else ValueError)."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"{method}: layers must be a list of layer indices, got {layers!r}")
    layers = list(layers)
    odd = [l for l in layers if not (isinstance(l, numbers.Integral) and not isinstance(l, bool))]
    if odd:
        raise ValueError(f"{method}: layers must be integers (layer indices), got {odd[0]!r}")
    layers = sorted(int(l) for l in layers)
    bad = [l for l in layers if not 0 <= l <= depth - 2]
    if bad:
        raise ValueError(f"{method}: layers {bad} out of range: reductions happen after layers 0..{depth - 2}")
    return layers


def default_prune_layers(depth: int) -> list[int]:
    """ToP-ViM prunes after 0-based layers 4, 9, 14 of 24; other depths get the same fractions of the depth."""
    return sorted({min(max(round(depth * f / 24) - 1, 0), depth - 2) for f in (5, 10, 15)})
