"""The compiled training scan (``stm_fast.ops.scan_fused.scan_differentiable_fused``, C++ in
``ops/csrc/selective_scan_cpu_grad.cpp``): forward against the float64 reference ``stm_ref.ssm`` (eq. 3),
gradients against finite differences (float64) and against the torch twin ``ops.scan_autograd`` (float32,
within the twin's own error), both scan directions, decay scales, chunk sizes, and a model's training step."""

import numpy as np
import pytest
import torch

from stm_fast.ops import scan_fused
from stm_fast.ops.scan_autograd import scan_differentiable
from stm_fast.ops.scan_fused import TrainScanFunction, scan_differentiable_fused
from stm_ref import ssm as ref

OK, REASON = scan_fused.available()
if not OK:
    pytest.skip(f"fused CPU scan unavailable: {REASON}", allow_module_level=True)


def inputs(seed, batch, E, L, N, dtype=torch.float64, decay=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, dtype=dtype, generator=g)  # noqa: E731
    u, B, C = r(batch, E, L), r(batch, N, L), r(batch, N, L)
    delta = torch.rand(batch, E, L, dtype=dtype, generator=g) * 0.5 + 0.01
    A = -(torch.rand(E, N, dtype=dtype, generator=g) * 3 + 0.1)
    scale = torch.rand(batch, L, dtype=dtype, generator=g) + 0.5 if decay else None
    return [t.requires_grad_() if t is not None else None for t in (u, delta, A, B, C, scale)]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 23, 3), (3, 37, 40, 16), (1, 1, 1, 1)])
def test_forward_matches_the_float64_reference(shape, reverse):
    """y = C.h and the last state of eq. 3 (Euler step, as Mamba's kernels) equal stm_ref.ssm's to 1e-12."""
    batch, E, L, N = shape
    u, delta, A, B, C, _ = inputs(0, batch, E, L, N)
    y, last = scan_differentiable_fused(u, delta, A, B, C, reverse=reverse)
    flip = (lambda t: t.flip(-1)) if reverse else (lambda t: t)
    y_ref, h_ref = ref.selective_scan(*(flip(t).detach().numpy() for t in (u, delta)), A.detach().numpy(),
                                      *(flip(t).detach().numpy() for t in (B, C)), return_last_state=True)
    scale = 1 + np.abs(y_ref).max()
    assert np.abs(flip(y).detach().numpy() - y_ref).max() / scale < 1e-12
    assert np.abs(last.detach().numpy() - h_ref).max() / (1 + np.abs(h_ref).max()) < 1e-12


@pytest.mark.parametrize("reverse", [False, True])
def test_gradients_match_finite_differences(reverse):
    """float64 gradcheck of every input, the decay scale included (the hand-written reverse scan is right)."""
    u, delta, A, B, C, scale = inputs(1, 2, 5, 11, 3, decay=True)
    f = lambda *a: scan_differentiable_fused(*a[:5], decay_scale=a[5], reverse=reverse)  # noqa: E731
    assert torch.autograd.gradcheck(f, (u, delta, A, B, C, scale))


@pytest.mark.parametrize("chunk", [1, 3, 16, 64])
def test_gradients_do_not_depend_on_the_checkpoint_interval(chunk):
    """The backward recomputes each chunk from its checkpoint: any chunk length gives the same gradients."""
    u, delta, A, B, C, _ = inputs(2, 2, 20, 37, 4)
    rows = [t.transpose(1, 2).contiguous() for t in (delta, delta * u, B, C)]
    y, last = TrainScanFunction.apply(rows[0], rows[1], A, rows[2], rows[3], False, chunk)
    g = torch.autograd.grad(y.sum() + 0.5 * last.sum(), (u, delta, A, B, C))
    y0, last0 = scan_differentiable(u, delta, A, B, C)
    g0 = torch.autograd.grad(y0.sum() + 0.5 * last0.sum(), (u, delta, A, B, C))
    for a, b in zip(g, g0):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def _grads(fn, args, w, wh):
    y, h = fn(*args)
    return [t.double() for t in torch.autograd.grad((y * w).sum() + (h * wh).sum(), [a for a in args if a is not None])]


@pytest.mark.parametrize("reverse", [False, True])
def test_float32_gradients_are_as_accurate_as_the_torch_twins(reverse):
    """At Vim shapes (L 197, N 16) in float32, each gradient's error against float64 is at most 4x the torch
    twin's own float32 error (plus one ulp of the scale)."""
    args64 = inputs(3, 2, 64, 197, 16, decay=True)
    args32 = [t.detach().float().requires_grad_() for t in args64]
    w = torch.randn(2, 64, 197, dtype=torch.float64)
    wh = torch.randn(2, 64, 16, dtype=torch.float64)
    flip = (lambda t: t.flip(-1)) if reverse else (lambda t: t)

    def twin(u, delta, A, B, C, s):  # the torch twin scans a flipped copy for the backward direction
        y, h = scan_differentiable(flip(u), flip(delta), A, flip(B), flip(C), decay_scale=flip(s))
        return flip(y), h

    def fused(u, delta, A, B, C, s):
        return scan_differentiable_fused(u, delta, A, B, C, decay_scale=s, reverse=reverse)

    exact = _grads(twin, args64, w, wh)
    mine = _grads(fused, args32, w.float(), wh.float())
    theirs = _grads(twin, args32, w.float(), wh.float())
    for e, m, t in zip(exact, mine, theirs):
        scale = e.abs().max()
        assert (m - e).abs().max() <= 4 * (t - e).abs().max() + 1.2e-7 * scale


def test_a_models_training_step_has_the_torch_backends_gradients():
    """A float64 Vim's loss gradients through the fused training scan equal those through the torch backend."""
    from stm_fast.models import create_model

    torch.manual_seed(0)
    m = create_model("vim_tiny", img_size=8, patch_size=2, channels=1, embed_dim=8, depth=2, d_state=4,
                     num_classes=3, dtype=torch.float64).train()
    x, y = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2])
    grads = {}
    for backend in ("fused", "torch"):
        m.set_scan_backend(backend)
        m.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        grads[backend] = [p.grad.clone() for p in m.parameters()]
    for a, b in zip(grads["fused"], grads["torch"]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reverse", [False, True])
def test_grouped_B_and_C_with_gradients_go_through_the_torch_twin(reverse):
    """The training kernel takes (batch, N, L) B and C only; the fused backend runs other layouts (grouped
    (batch, G, N, L) here) through the differentiable torch scan, forward and backward, with the torch
    backend's values (as before the fused backend was differentiable, when gradients always went to torch)."""
    from stm_fast import ssm

    g = torch.Generator().manual_seed(5)
    u = torch.randn(2, 4, 9, dtype=torch.float64, generator=g, requires_grad=True)
    delta = torch.randn(2, 4, 9, dtype=torch.float64, generator=g, requires_grad=True)
    A = (-torch.rand(4, 3, dtype=torch.float64, generator=g) - 0.1).requires_grad_()
    B = torch.randn(2, 2, 3, 9, dtype=torch.float64, generator=g, requires_grad=True)
    C = torch.randn(2, 2, 3, 9, dtype=torch.float64, generator=g, requires_grad=True)
    outs = {}
    for backend in ("fused", "torch"):
        y = ssm.selective_scan(u, delta, A, B, C, delta_softplus=True, backend=backend, reverse=reverse)
        outs[backend] = (y, torch.autograd.grad(y.square().sum(), (u, delta, A, B, C)))
    torch.testing.assert_close(outs["fused"][0], outs["torch"][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(outs["fused"][1], outs["torch"][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
