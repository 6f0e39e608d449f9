"""No reduction method's step makes the host wait for the device (issue 25, item 5).

A host sync (reading a tensor's value on the host, or an op whose output size depends on the data) drains
the device's queue: on a GPU it is a cost one method pays and another does not, and a speed comparison
would compare syncs rather than methods. A CPU run has no queue to drain, but the same calls are made, so
they are counted here: the value reads (``item``, ``tolist``, ``numpy``, ``cpu``, conversions by ``bool``,
``int``, ``float``, ``__index__``), data-sized ops (``nonzero``, boolean-mask indexing, ``masked_select``,
``unique``, ``equal``) seen by a dispatch mode, and the linalg calls that check their result on the host
(their ``_ex`` twins do not). Counted: one reduced forward of a small model (batch 3, so class tokens
move differently per image), after a first forward has filled the plan caches; steps, decay scales and
the class-token read-out included. Each Python-level read counts once, whatever it dispatches inside.

``ALLOWED``: the syncs a method may make and why (docs/peers.md); every other method is held to none.
"""

import contextlib
import traceback
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import stm_fast
from stm_fast.reduction.base import METHODS
from stm_fast.reduction.merge import TOKEN_WEIGHT_VARIANTS
from stm_fast.reduction.tokens import TokenState, kept_from_mask
from tests.builders import random_model

READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero")
CHECKED_LINALG = ("solve", "inv", "cholesky", "lu_factor", "ldl_factor")
DATA_SIZED = {"nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
              "unique_dim_consecutive", "equal", "is_nonzero", "_local_scalar_dense", "item"}


# method -> (host syncs allowed in one reduced forward, given its number of steps; why)
ALLOWED = {"evit": (lambda steps: steps,
                    "one a step: the batch's smallest and largest class index bound the class attention's spans, "
                    "whose shapes set the order of its channel sums (bounds fixed by the schedule need no sync "
                    "but change the importances' last bits)")}


def _caller():
    """The innermost frame in stm_fast, as 'module.py:line function' (for the failure message)."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if "/stm_fast/" in path:
            return f"{path.rsplit('/stm_fast/', 1)[-1]}:{frame.lineno} {frame.name}"
    return "outside stm_fast"


class _Syncs(TorchDispatchMode):
    """Records data-sized aten ops (boolean-mask indexing included) unless a counted Python read is running."""

    def __init__(self, log):
        super().__init__()
        self.log, self.inside = log, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        masks = name.startswith("index") and len(args) > 1 and isinstance(args[1], (list, tuple)) and any(
            isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in args[1])
        if not self.inside and (name in DATA_SIZED or masks):
            self.log.append(f"aten.{name}{' (boolean mask)' if masks else ''} at {_caller()}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_syncs():
    """Within the block, every host sync is appended (described) to the yielded list."""
    log = []
    mode = _Syncs(log)

    def counted(owner, name):
        original = getattr(owner, name)

        def call(*args, **kwargs):
            if not mode.inside:
                log.append(f"{getattr(owner, '__name__', owner)}.{name} at {_caller()}")
            mode.inside += 1
            try:
                return original(*args, **kwargs)
            finally:
                mode.inside -= 1
        return mock.patch.object(owner, name, call)

    patches = [counted(torch.Tensor, n) for n in READS] + [counted(torch, "nonzero")]
    patches += [counted(torch.linalg, n) for n in CHECKED_LINALG]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        stack.enter_context(mode)
        yield log


def _cases():
    """Every registered method and flavour with its defaults, then options that take other branches."""
    cases = []
    for name, cls in METHODS.items():
        cases.append((name, {}))
        cases += [(name, {"flavour": flavour}) for flavour in cls.flavours]
    cases += [("stm", dict(weights=w)) for w in TOKEN_WEIGHT_VARIANTS if w != "lsq"]
    cases += [("stm", dict(positions="uniform")), ("stm", dict(positions="uniform", weights="size")),
              ("stm", dict(sides="left")), ("tome", dict(layers="all")), ("top", dict(align=False)),
              ("mtr", dict(keep_frac=0.0)), ("tome", dict(flavour="rmeeto", mode="prune"))]
    return cases


@pytest.fixture(scope="module")
def model():
    return random_model(0, img_size=32, patch_size=4, embed_dim=16, depth=6, d_state=4, dtype=torch.float32).eval()


def _reduced_forward_syncs(model, reduction, images):
    """(syncs of one reduced forward after a warm-up one, the token states its steps were given)."""
    steps = []

    def hook(step, args):
        steps.append(args[3])
        return step(*args)

    with torch.inference_mode(), stm_fast.reduced(model, reduction.with_step_hook(hook)):
        model(images)  # fills the plan caches (built once per shape on the host, not per step)
        steps.clear()
        with counting_syncs() as log:
            model(images)
    return log, steps


@pytest.mark.parametrize("method,options", _cases(), ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={x}" for k, x in v.items()) or "defaults")
def test_a_reduced_forward_makes_no_host_sync_beyond_the_allowed_ones(model, method, options):
    """Steps, decay scales and the class-token read-out of every method and flavour read nothing back from the
    device (a CPU count of the calls that would on a GPU), except what ``ALLOWED`` lists with its reason."""
    reduction = stm_fast.make_reduction(model, method, rate=0.3, **options)
    log, steps = _reduced_forward_syncs(model, reduction, torch.randn(3, 3, 32, 32))
    assert len(steps) == sum(1 for k in reduction.schedule if k) >= 1, "the forward must run the method's steps"
    allowed = ALLOWED[method][0](len(steps)) if method in ALLOWED and "flavour" not in options else 0
    why = f" ({ALLOWED[method][1]})" if allowed else ""
    assert len(log) == allowed, f"{method} {options}: {len(log)} host sync(s), {allowed} allowed{why}:\n" + "\n".join(log)
    for tokens in steps:  # a class index the host claims to know without reading it holds on the device
        assert tokens.shared_cls is None or bool((tokens.cls == tokens.shared_cls).all())


def test_the_plain_forward_makes_no_host_sync(model):
    """The control: the unreduced model's layer loop itself reads nothing back from the device."""
    with torch.inference_mode(), counting_syncs() as log:
        model(torch.randn(3, 3, 32, 32))
    assert log == []


def test_the_counter_sees_each_kind_of_sync():
    """The count is only as good as what it sees: a read, a data-sized op, a boolean mask, a checked solve."""
    t, mask = torch.arange(4.0), torch.tensor([True, False, True, False])
    with counting_syncs() as log:
        int(t[0]), bool(t.sum() > 0), t.tolist(), torch.nonzero(mask), t[mask], torch.linalg.solve(torch.eye(2), t[:2])
    assert len(log) == 6, log


@pytest.mark.parametrize("seed", range(5))
def test_kept_from_mask_gives_nonzeros_indices_without_a_sync(seed):
    """The ascending kept indices of a mask with the same count per image, as ``nonzero`` gives them."""
    g = torch.Generator().manual_seed(seed)
    batch, L, count = 4, 11 + seed, 3 + seed
    mask = torch.zeros(batch, L, dtype=torch.bool)
    mask.scatter_(1, torch.rand(batch, L, generator=g).argsort(dim=1)[:, :count], True)
    with counting_syncs() as log:
        got = kept_from_mask(mask, count)
    assert log == []
    assert torch.equal(got, torch.nonzero(mask)[:, 1].view(batch, count))


def test_a_data_dependent_keep_leaves_no_shared_class_index():
    """Where the class token lands after a keep depends on the image: the state does not claim a shared index
    (claiming one would read cls back), and the read-out gathers each image's row."""
    tokens = TokenState.start(2, 9, 4, "cpu", torch.float32)
    kept = torch.tensor([[0, 1, 2, 4, 5, 8], [0, 1, 2, 4, 6, 7]])  # the same index in both, unknown to the host
    with counting_syncs() as log:
        after = tokens.kept(kept)
        x = torch.randn(2, 6, 3)
        rows = after.class_rows(x)
    assert log == [] and after.shared_cls is None
    assert torch.equal(rows, x[:, 3])
