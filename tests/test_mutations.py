"""The verification suite can fail: break the reference by 1e-9 relative and each claim's property must catch it.

Each case wraps one reference function so its result is off by a factor (1 + 1e-9), runs the
property test that guards that claim (docs/conventions.md §11) under a short Hypothesis search without shrinking,
and asserts that the property fails. A tolerance loose enough to hide a 1e-9 error fails here.
"""

import pytest

from stm_ref import merge, ssm
from tests.builders import search_profile
from verify import (test_bidirectional, test_discretize, test_estimated_weights, test_exact_merge, test_fading,
                    test_closed_form, test_selective_scan, test_token_form)

EPS = 1e-9


def _scaled(fn, which=None):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        if isinstance(out, dict):
            return {k: v * (1 + EPS) for k, v in out.items()}
        if isinstance(out, tuple):
            return tuple(o * (1 + EPS) if i == which else o for i, o in enumerate(out))
        return out * (1 + EPS)
    return wrapper


def _scaled_in(direction):
    def make(fn):
        def wrapper(Abar, Bbar, plan, d="forward", *a, **k):
            out = fn(Abar, Bbar, plan, d, *a, **k)
            return {j: w * (1 + EPS) for j, w in out.items()} if d == direction else out
        return wrapper
    return make


CASES = {
    "claim 1: scan off by 1e-9": (ssm, "scan", _scaled, test_closed_form.test_recurrence_equals_closed_form),
    "claim 1: attention off by 1e-9": (ssm, "hidden_attention", _scaled, test_closed_form.test_hidden_attention_reproduces_outputs),
    "eq. 2: ZOH factor off by 1e-9": (ssm, "_phi1", _scaled, test_discretize.test_zoh_matches_scipy_cont2discrete),
    "selective_scan: softplus off by 1e-9": (ssm, "softplus", _scaled,
                                             test_selective_scan.test_selective_scan_matches_attention_form_in_every_layout),
    "claim 2: exact weights off by 1e-9": (merge, "merge_weights", _scaled,
                                           test_exact_merge.test_exact_merge_reproduces_hidden_states_at_kept_positions),
    "claim 2: merged decay off by 1e-9": (merge, "_gap_products", _scaled,
                                          test_exact_merge.test_final_loss_is_zero_and_merging_loss_cancels_removal_losses),
    "claim 3: N=1 token off by 1e-9": (merge, "merge_weights", _scaled, test_token_form.test_with_one_state_the_exact_merge_is_a_token),
    "claim 4: merged states off by 1e-9": (merge, "merged_states", _scaled,
                                           test_estimated_weights.test_loss_at_merge_point_is_the_weight_error_times_the_input),
    "claim 5: fading factor off by 1e-9": (merge, "fading_factor", _scaled,
                                           test_fading.test_loss_after_the_last_perturbation_is_the_decayed_loss),
    "claim 6: backward weights off by 1e-9": (merge, "merge_weights", _scaled_in("backward"),
                                              test_bidirectional.test_exact_merges_preserve_the_class_token_in_both_directions),
}


@pytest.fixture
def quick_search():
    with search_profile("mutation", max_examples=40):
        yield


@pytest.mark.parametrize("name", list(CASES))
def test_property_catches_a_1e9_relative_error(name, monkeypatch, quick_search):
    module, attr, mutate, prop = CASES[name]
    monkeypatch.setattr(module, attr, mutate(getattr(module, attr)))
    with pytest.raises(AssertionError):
        prop()


def test_unmutated_properties_pass(quick_search):
    """The control: the same properties pass on the real reference under the same search."""
    for _, _, _, prop in CASES.values():
        prop()
