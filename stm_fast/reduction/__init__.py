"""Token reduction for Vision Mamba: one API for STM and its peers, a reduction as a value.

``make_reduction(model_or_cfg, method, rate=None, schedule=None, **options)`` builds an immutable
``Reduction``; ``reduce(model, ...)`` builds one and installs it as the model's only reduction state
(``model.reduction``), ``reduce(model, "none")`` removes it, and ``with reduced(model, ...):`` applies one
for a block and restores what was there before. A reduction acts between layers on the stream
x = residual + mixer output (docs/conventions.md §5); the class token is tracked per image.

Rates and schedules (docs/conventions.md §6): rate = 1 - sum_l N_l / (depth * N_0); a schedule is the
number of tokens removed after each layer, in total. A requested rate is met within ±1 percentage point
by a schedule as uniform as possible over the layers the method reduces at; the schedule used is
reported in the ``Reduction``.

Methods (one module each, registered with ``@register_method``): ``stm`` (``stm.py``), ``tome``,
``top``, ``evit``, ``mtr``, any method another module of this package registers, and ``none``. A new
method is one new module here: every module of this package is imported, and registers itself. The peers' released code is
reproduced by flavours (``register_flavour``): ``tome`` with ``flavour="rmeeto"`` (``rmeeto.py``) and
``top`` with ``flavour="released"`` (``top_released.py``); docs/peers.md compares them.
"""

from __future__ import annotations

import importlib
import pkgutil
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, Iterator

from . import stm, tome, top, evit, mtr, rmeeto, top_released  # noqa: F401, I001  (the paper's methods, listed in this order)
from .base import METHODS, Method, Reduction, ReductionPass, register_flavour, register_method
from .schedule import check_rate, check_schedule, check_step_limits, rate_of, solve_schedule, tokens_per_layer
from .stm import STM_DEFAULTS

__all__ = ["make_reduction", "reduce", "reduced", "install", "list_methods", "method_class", "Reduction",
           "ReductionPass", "Method", "METHODS", "register_method", "register_flavour", "STM_DEFAULTS", "check_rate", "rate_of", "solve_schedule", "tokens_per_layer"]


for _module in pkgutil.iter_modules(__path__):  # any other module registers its method too: nothing to list here
    importlib.import_module(f"{__name__}.{_module.name}")


def list_methods() -> list[str]:
    """Every method name ``reduce`` accepts, ``none`` first."""
    return ["none", *METHODS]


def method_class(method: str, flavour: str | None = None) -> type[Method]:
    """The class of ``method``, or of its named ``flavour`` (e.g. ``tome`` with ``flavour="rmeeto"``)."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown reduction method {method!r}; choose one of {', '.join(list_methods())}")
    cls = METHODS[method]
    if flavour is None:
        return cls
    if flavour not in cls.flavours:
        choices = ", ".join(sorted(cls.flavours)) or "none"
        raise ValueError(f"{method}: unknown flavour {flavour!r}; its flavours: {choices} (or no flavour: the paper's)")
    return cls.flavours[flavour]


def _none(cfg, rate, schedule) -> Reduction:
    removes = (rate is not None and check_rate(rate) > 0) or (
        schedule is not None and any(check_schedule(schedule, cfg.depth, range(cfg.depth - 1), 1, None, "none")))
    if removes:
        raise ValueError("method 'none' takes no rate or schedule")
    L, depth = cfg.num_tokens, cfg.depth
    return Reduction(method="none", options=MappingProxyType({}), schedule=(0,) * (depth - 1), tokens_per_layer=(L,) * depth,
                     rate=0.0, requested_rate=0.0, overhead_flops_per_layer=(0,) * (depth - 1))


def make_reduction(model_or_cfg, method: str, rate: float | None = None, schedule=None, **options: Any) -> Reduction:
    """The ``Reduction`` of ``method`` with ``options`` on a model (or its ``VimConfig``), without installing it.

    ``rate``: the token reduction rate in [0, 1), met within ±1 point (else ValueError naming what is
    feasible); or ``schedule``: tokens removed after each layer, in total (an int applies to every allowed
    layer; for ``stm`` with sides='both' an entry of 2k removes k per side, so the paper's "2 tokens per
    direction at every layer" is ``schedule=4``). Options: see each method's module (``stm``: sides,
    positions, weights, start_layer; ``tome``: layers; ``top``: layers, align; ``evit``: layers).
    """
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    if method == "none":
        return _none(cfg, rate, schedule)
    if rate is not None and schedule is not None:
        raise ValueError(f"reduce(..., '{method}'): give exactly one of rate= or schedule=")
    impl = method_class(method, options.get("flavour"))(cfg, **options)
    depth, L = cfg.depth, cfg.num_tokens
    if schedule is None and rate is None:
        schedule = impl.default_schedule()
        if schedule is None:
            raise ValueError(f"reduce(..., '{method}'): give exactly one of rate= or schedule=")
    elif schedule is None:
        rate = check_rate(rate)
        schedule, solved = impl.solve(rate)
        if solved:  # e.g. a released rule's parameter: a new method object with it, nothing written back
            impl = type(impl)(cfg, **{**options, **solved})
    else:
        schedule = check_schedule(schedule, depth, impl.reduction_points(), impl.step_unit, impl.token_budget(), method)
    tokens = tokens_per_layer(L, schedule, depth)
    check_step_limits(method, schedule, tokens, impl.max_per_step)
    overhead = tuple(impl.overhead_flops(tokens[i], k) if k else 0 for i, k in enumerate(schedule))
    return Reduction(method=method, options=MappingProxyType(dict(impl.options)), schedule=tuple(schedule),
                     tokens_per_layer=tuple(tokens), rate=rate_of(tokens), requested_rate=rate,
                     overhead_flops_per_layer=overhead, impl=impl)


def install(model, reduction):
    """Make ``reduction`` the model's only reduction state (None or a 'none' reduction: the plain model).
    Besides ``Reduction`` values, any object with the model's ``TokenReduction`` interface is accepted
    (``stm_fast.analysis`` installs one that removes nothing and only observes the layers)."""
    if not isinstance(reduction, Reduction):
        model.reduction = reduction
        return model
    if reduction.method != "none":
        cfg = reduction.impl.cfg
        if (cfg.depth, cfg.num_patches) != (model.cfg.depth, model.cfg.num_patches):
            raise ValueError(f"this {reduction.method} reduction was made for a model with depth {cfg.depth} and "
                             f"{cfg.num_patches} patches; the model has depth {model.cfg.depth} and "
                             f"{model.cfg.num_patches}: make it with make_reduction(model, ...)")
    model.reduction = None if reduction is None or reduction.method == "none" else reduction
    return model


def reduce(model, method: str, rate: float | None = None, schedule=None, **options: Any):
    """Install ``make_reduction(model, method, rate, schedule, **options)`` on ``model`` and return the model
    (``method="none"`` removes the reduction). ``model.reduction`` then holds the ``Reduction``."""
    return install(model, make_reduction(model, method, rate=rate, schedule=schedule, **options))


@contextmanager
def reduced(model, method, rate: float | None = None, schedule=None, **options: Any) -> Iterator[Reduction]:
    """Within the block the model runs with a reduction (a ``Reduction`` value, or a method name and its
    arguments as for ``reduce``, or any ``TokenReduction``); afterwards the reduction it had before is back.
    Yields the value."""
    if not isinstance(method, str) and (rate is not None or schedule is not None or options):
        raise TypeError("reduced(model, reduction): a Reduction value takes no rate, schedule or options")
    value = method if not isinstance(method, str) else make_reduction(model, method, rate, schedule, **options)
    saved = model.reduction
    install(model, value)
    try:
        yield value
    finally:
        model.reduction = saved
