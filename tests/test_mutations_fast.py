"""The fast path's verification can fail: perturb one element of one fast function's output by 1e-6 relative,
and a property of the certification (``verify/test_fast_path.py``, its cases and checks in ``verify/fast_path.py``) must notice (the float64 logits against the reference, or the
reported rate against the tokens each layer receives).

Each mutant wraps one function where the fast path calls it: a scan backend's output, STM's weights and its
merge, ToMe's merge, ToP's alignment scale, EViT's importances and its fused token, the schedule solver's
achieved rate, and the fused CPU kernel's output and its STM weights. The properties run on ``coverage_cases()`` (every method and option, fixed) and then on a
short Hypothesis search. ``test_unmutated_properties_pass`` is the control. The mutants caught are listed by
``pytest tests/test_mutations_fast.py -v`` (one test id each).
"""

import pytest
import torch
from hypothesis import given

import stm_fast.reduction as reduction_pkg
from stm_fast import ssm
from stm_fast.ops import scan_fused, scan_torch
from stm_fast.reduction import evit, stm, tome, top
from verify.fast_path import cases, check_float64, check_rate, coverage_cases
from verify.mutations import search_profile

EPS = 1e-6


def _bump(t, index=None):
    """t with one element scaled by (1 + EPS), in place on a copy (the first element unless ``index``)."""
    t = t.clone()
    t[index if index is not None else (0,) * t.dim()] *= 1 + EPS
    return t


def _first_output(fn):
    def wrapper(*a, **k):
        out = fn(*a, **k)
        return (_bump(out[0]), *out[1:]) if isinstance(out, tuple) else _bump(out)
    return wrapper


def _decay_scale(fn):
    def wrapper(self, tokens):
        out = fn(self, tokens)
        return None if out is None else (_bump(out[0], (0, out[0].shape[1] - 1)), out[1])
    return wrapper


def _least_important(fn):
    def wrapper(stats, cls):
        imp = fn(stats, cls)
        probe = imp.clone()
        probe[torch.arange(imp.shape[0]), cls] = float("inf")
        return _bump(imp, (0, int(probe[0].argmin())))  # a token that is fused, so its weight matters
    return wrapper


def _rate(fn):
    return lambda tokens: fn(tokens) * (1 + EPS)


def _searched(check, *args):
    """``check(case, *args)`` under a Hypothesis search of the certification's cases."""
    @given(case=cases())
    def prop(case):
        check(case, *args)
    prop()


def F64(backend="torch"):
    """The float64 property on every coverage case, then on a search (both must pass unmutated)."""
    for case in coverage_cases():
        check_float64(case, "cpu", backend)
    _searched(check_float64, "cpu", backend)


def F64_FUSED():
    F64("fused")


def RATE():
    for case in coverage_cases():
        check_rate(case)
    _searched(check_rate)


CASES = {  # name: (module, attribute, mutation, property)
    "torch scan output": (scan_torch, "scan_inference", _first_output, F64),
    "fused scan output": (scan_fused, "selective_scan_fused", _first_output, F64_FUSED),
    "fused STM weights": (scan_fused, "ends_lsq_weights", _first_output, F64_FUSED),
    "STM weights (ends plan)": (stm, "ends_weights", _first_output, F64),
    "STM weights (other plans)": (stm, "token_weights", _first_output, F64),
    "STM merge (ends plan)": (stm, "merge_ends", _first_output, F64),
    "STM merge (other plans)": (stm, "merge_tokens", _first_output, F64),
    "ToMe merge": (tome.ToMe, "_merge", lambda fn: staticmethod(_first_output(fn)), F64),
    "ToP alignment scale": (top.ToP, "decay_scales", _decay_scale, F64),
    "EViT importances": (evit, "class_attention", _least_important, F64),
    "EViT fused token": (evit, "fuse_tokens", _first_output, F64),
    "solver's achieved rate": (reduction_pkg, "rate_of", _rate, RATE),
}


@pytest.fixture
def long_search():
    with search_profile("fast-mutation", max_examples=20):
        yield


def _original(module, attr):
    value = module.__dict__[attr]
    return value.__func__ if isinstance(value, staticmethod) else value


@pytest.mark.parametrize("name", list(CASES))
def test_fast_path_property_catches_a_1e6_relative_error(name, monkeypatch, long_search):
    module, attr, mutate, prop = CASES[name]
    if prop is F64_FUSED and "fused" not in ssm.available_backends("cpu"):
        pytest.skip("the fused CPU kernel does not build here")
    monkeypatch.setattr(module, attr, mutate(_original(module, attr)))
    with pytest.raises((AssertionError, ExceptionGroup)):  # Hypothesis may report several failures at once
        prop()


def test_unmutated_properties_pass(long_search):
    """The control: the same properties pass on the real fast path under the same search."""
    F64()
    if "fused" in ssm.available_backends("cpu"):
        F64("fused")
    RATE()
