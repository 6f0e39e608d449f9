"""Shared pytest set-up: Hypothesis profiles, and benchmarks that only time under --benchmark-only."""

import os

import pytest
from hypothesis import HealthCheck, settings

# `ci` (default): deterministic and bounded, so the suite takes the same time and finds the same
# examples on every run. `thorough`: many more random examples, for local deep runs. `gpu`: as `ci` with
# fewer examples, for benchmarks/gpu_check.sh on a lent GPU machine's few minutes (JIT compiles included).
_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("ci", derandomize=True, database=None, max_examples=40, **_COMMON)
settings.register_profile("thorough", max_examples=1000, **_COMMON)
settings.register_profile("gpu", derandomize=True, database=None, max_examples=8, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Benchmarks run once, untimed, as smoke tests unless the user asks for timing with
    # --benchmark-only or --benchmark-enable; so plain `pytest` stays fast.
    opt = config.option
    if hasattr(opt, "benchmark_disable"):
        if not getattr(opt, "benchmark_only", False) and not getattr(opt, "benchmark_enable", False):
            opt.benchmark_disable = True
