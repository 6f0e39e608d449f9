"""The method registry is complete: every registered reduction method and flavour (``stm_fast.reduction``) has
its float64 twin (``stm_ref.reduction``) and matches it on each of its example options, an eval group
(``stm_fast.eval.groups``), and example options that build. A method added as one module is tested here
without a line naming it; the certification (verify/test_fast_path.py) draws from the same registry."""

import numpy as np
import pytest
import torch

import stm_fast
from stm_fast.eval.groups import GROUPS, Point
from stm_fast.reduction import METHODS
from stm_fast.registry import MODEL_CONFIGS
from stm_ref import vim as ref_vim
from stm_ref.reduction import TWINS
from tests.builders import GEOMETRY, random_model

DEPTH = 4


def registered():
    """(method, flavour or None, class) of every registered method and flavour."""
    return [(n, None, cls) for n, cls in METHODS.items()] + \
        [(n, f, fl) for n, cls in METHODS.items() for f, fl in cls.flavours.items()]


EXAMPLES = [(n, f, o) for n, f, cls in registered() for o in cls.example_options(DEPTH)]


def test_every_registered_method_has_a_twin_and_every_twin_a_method():
    assert {(n, f) for n, f, _ in registered()} == set(TWINS)


def test_every_registered_method_has_an_eval_group_that_runs_it():
    """Each method and flavour is run by some --methods group (on Vim-Ti's shape, at a rate all can reach)."""
    cfg = MODEL_CONFIGS["vim_tiny"]
    point = Point(0.2, None, dict(stm_fast.reduction.STM_DEFAULTS), cfg)
    ran = {(e.method, e.opts.get("flavour")) for g in GROUPS.values() for e in g.experiments(point)[0]}
    assert {(n, f) for n, f, _ in registered()} <= ran


@pytest.mark.parametrize("method, flavour, options", EXAMPLES, ids=[f"{n}-{f}-{i}" for i, (n, f, _) in enumerate(EXAMPLES)])
def test_every_example_of_every_method_matches_its_twin(method, flavour, options):
    """The fast step and its float64 twin give the same logits (1e-9) on a reduction that changes them."""
    img, patch, stride = GEOMETRY[17]
    m = random_model(3, img, patch, 8, DEPTH, 4, stride=stride)
    impl = stm_fast.reduction.method_class(method, flavour)(m.cfg, **options)
    stm_fast.reduce(m, method, schedule=impl.example_schedule(), **options)
    assert m.reduction.active, f"{method} {options}: its example schedule removes nothing"
    x = torch.randn(3, 3, img, img, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    ref = ref_vim.forward(sd, x.numpy(), reduction=m.reduction.to_dict())
    assert np.abs(ref - ref_vim.forward(sd, x.numpy())).max() > 1e-6, "the reduction must change the logits"
    with torch.no_grad():
        err = np.abs(m(x).numpy() - ref).max()
    assert err <= 1e-9, f"{method} {options}: max |dlogit| {err:.3e}"
