"""A Hypothesis profile for the duration of a test: the mutation tests search longer than the suite's default."""

from contextlib import contextmanager

from hypothesis import Phase, settings


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
