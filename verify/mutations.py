"""The verification suite can fail: helpers that break one reference function by a relative 1e-9 and run the
property guarding it under a short Hypothesis search, which must then fail (docs/conventions.md §11). Each
property module holds its own mutation tests beside the properties; this module only builds them."""

from __future__ import annotations

from contextlib import contextmanager

from hypothesis import Phase, settings

__all__ = ["EPS", "scaled", "scaled_in", "search_profile", "catches"]

EPS = 1e-9


def scaled(fn, which=None):
    """``fn`` with its result off by a factor (1 + EPS): every value of a dict, output ``which`` of a tuple."""
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        if isinstance(out, dict):
            return {k: v * (1 + EPS) for k, v in out.items()}
        if isinstance(out, tuple):
            return tuple(o * (1 + EPS) if i == which else o for i, o in enumerate(out))
        return out * (1 + EPS)
    return wrapper


def scaled_in(direction):
    """A mutation of ``merge_weights``-like functions (Abar, Bbar, plan, direction, ...) in one direction only."""
    def make(fn):
        def wrapper(Abar, Bbar, plan, d="forward", *a, **k):
            out = fn(Abar, Bbar, plan, d, *a, **k)
            return {j: w * (1 + EPS) for j, w in out.items()} if d == direction else out
        return wrapper
    return make


@contextmanager
def search_profile(name: str, max_examples: int):
    """Load a profile with ``max_examples`` and the explicit and generate phases, then restore the previous one."""
    current = settings.default
    settings.register_profile(name, parent=current, max_examples=max_examples, phases=[Phase.explicit, Phase.generate],
                              report_multiple_bugs=False)
    settings.load_profile(name)
    try:
        yield
    finally:
        settings.register_profile(f"_restore_{name}", parent=current)
        settings.load_profile(f"_restore_{name}")


def catches(prop, module, attr, mutate, monkeypatch, max_examples=40) -> bool:
    """Whether property ``prop`` fails once ``module.attr`` is replaced by ``mutate(module.attr)``; the same short
    search without the mutation must pass (the control), else the answer would mean nothing."""
    with search_profile("mutation", max_examples):
        prop()  # the control
        monkeypatch.setattr(module, attr, mutate(getattr(module, attr)))
        try:
            prop()
        except AssertionError:
            return True
        finally:
            monkeypatch.undo()
    return False
