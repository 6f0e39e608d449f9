"""The ``torch`` selective-scan backend for inference: chunked over time, states first, reused buffers.

Reference twin: ``stm_ref.ssm.selective_scan``; differentiable twin: ``stm_fast.ops.scan_autograd``.
Time-major and chunked: the discretisation Abar = exp2(delta*A*log2 e), the input term Bbar*u and the
readout are vectorised over (chunk, batch, states, channels); the recurrence (eq. 3) runs inside the
chunk on cache-resident buffers and a state is carried between chunks. Every factor multiplied is an
Abar in (0, 1], so nothing can overflow (no log-space cumsum; docs/conventions.md §10).

States are held as (batch, N, D) so every op runs along the contiguous channel axis: broadcasts over N
or D are row operations, and the readout over N is one small (1 x N) @ (N x D) product per (step, image).
Inputs whose memory is channel-last (Vim's mixer) are read as (batch, L, D) rows without a transpose and
y comes back in that layout; (batch, D, L)-contiguous inputs cost two transposing copies of freshly
written data and get a contiguous y. docs/performance.md ("The torch backend") gives the measurements behind
this shape.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from .conv import conv  # noqa: F401  (this backend's conv: the torch one)
from .common import LOG2E, FirstSteps, ScanCall, ScanOutput, around_bare_scan, channel_last, reversed_by_flipping, \
    time_major_bc
from .scan_autograd import scan_differentiable

__all__ = ["scan", "check", "conv", "scan_inference", "doubling_scan", "release_workspace", "CHUNK"]

CHUNK = 16  # time steps per chunk (docs/performance.md: 16-32 alike, shorter chunks slower)


class _Workspace:
    """Per-thread scratch buffers, grown to the largest request and then sliced.

    A fresh multi-megabyte CPU buffer is page-faulted in on first touch (a large part of the scan's time
    when allocated per call; docs/performance.md), and a sequence that shrinks layer by layer (token reduction)
    then never reallocates. Only temporaries live here: everything returned to the caller is fresh. The
    buffers stay allocated between calls (about 5 * L * batch * D + 2 * 16 * batch * N * D floats);
    ``release_workspace()`` frees them. Other devices allocate per call (CUDA's caching allocator reuses).
    """

    _local = threading.local()

    @classmethod
    def get(cls, name, shape, like):
        if like.device.type != "cpu":
            return like.new_empty(shape)
        bufs = cls._local.__dict__.setdefault("bufs", {})
        # tensors made under inference_mode cannot be written outside it (and vice versa for views): one set each
        key = (name, like.device, like.dtype, torch.is_inference_mode_enabled())
        numel = math.prod(shape)
        buf = bufs.get(key)
        if buf is None or buf.numel() < numel:
            buf = like.new_empty(numel)
            bufs[key] = buf
        return buf[:numel].view(shape)

    @classmethod
    def clear(cls):
        cls._local.__dict__.pop("bufs", None)


@dataclass
class _Export:
    """The first n steps' delta, Abar and B as the chunk loop fills them (its own buffers)."""

    n: int
    delta: torch.Tensor | None = None
    Abar: torch.Tensor | None = None
    B: torch.Tensor | None = None
    filled: bool = False


def release_workspace() -> None:
    """Free this thread's scratch buffers of the CPU torch scan (they are reallocated on the next call)."""
    _Workspace.clear()


def _rows(t):
    """(batch, D, L) -> its (batch, L, D) view (contiguous rows when the memory is channel-last)."""
    return t.transpose(1, 2)


def _steps_and_inputs(u, delta, delta_bias, delta_softplus, decay_scale, cl):
    """The step delta (after bias and softplus; scaled by ``decay_scale`` for Abar only) and the input term
    delta*u, both as (batch, L, D) rows in reused buffers. Elementwise work happens in the callers' layout;
    only these two fresh results are turned into rows (faster than transposing cold inputs)."""
    batch, E, L = u.shape
    native = _rows if cl else (lambda t: t)  # noqa: E731
    per_channel = (lambda v: v) if cl else (lambda v: v[:, None])  # noqa: E731
    dc = _Workspace.get("dc", native(u).shape, u)
    if delta_bias is not None:
        torch.add(native(delta), per_channel(delta_bias), out=dc)
    else:
        dc.copy_(native(delta))
    if delta_softplus:
        torch.ops.aten.softplus.out(dc, 1, 20, out=dc)  # F.softplus's beta and threshold, in place
    du = torch.mul(dc, native(u), out=_Workspace.get("dun", dc.shape, u))
    if cl:
        dt = dc
    else:
        dt = _Workspace.get("dt", (batch, L, E), u).copy_(_rows(dc))
        du = _Workspace.get("du", (batch, L, E), u).copy_(_rows(du))
    if decay_scale is not None:
        dt.mul_(decay_scale[:, :, None])
    return dt, du


def _chunk_decays(dtt, A2, s, e, abuf, first, B_steps, mode):
    """Abar of steps s..e-1 as a list of (batch, N, D) rows and, for ``doubling``, as one buffer. When
    ``first`` asks for the first steps, their Abar goes straight into the export buffer (no copy), and
    ``B_steps`` ((L, batch, N), or None unless B is per step) is exported beside it."""
    n = e - s
    if first is None:
        a = torch.mul(dtt[s:e, :, None, :], A2, out=abuf[:n]).exp2_()
        return a.unbind(0), a
    k, batch, N, E = first.n, dtt.shape[1], A2.shape[0], A2.shape[1]
    hd = first.delta if first.delta is not None else dtt.new_empty(k, batch, E)
    ha = first.Abar if first.Abar is not None else dtt.new_empty(k, batch, N, E)
    first.delta, first.Abar = hd.copy_(dtt[:k]), torch.mul(dtt[:k, :, None, :], A2, out=ha).exp2_()
    if B_steps is not None:
        first.B = (first.B if first.B is not None else dtt.new_empty(k, batch, N)).copy_(B_steps[:k])
    else:
        first.B = None
    first.filled = True
    a = torch.mul(dtt[k:e, :, None, :], A2, out=abuf[k:n]).exp2_()
    rows = ha.unbind(0) + a.unbind(0)
    return rows, (abuf[:n].copy_(torch.cat([ha, a])) if mode == "doubling" else None)


def _chunk_recurrence(x, a, a_rows, h, mode):
    """h_t = Abar_t * h_{t-1} + (Bbar u)_t over one chunk, in place in x (eq. 3); returns x."""
    if mode == "sequential":  # one fused multiply-add per step on a contiguous (batch, N, D) slice
        for xt, at in zip(x.unbind(0), a_rows):
            xt.addcmul_(at, h)
            h = xt
        return x
    if mode == "doubling":  # log2(chunk) Hillis-Steele rounds, no per-step Python, twice the arithmetic
        return doubling_scan(a, x, h)
    raise ValueError(f"mode must be 'sequential' or 'doubling', got {mode!r}")


def _states_and_readout(dt, du, A, B, C, chunk, mode, first, like):
    """C·h for every step as (L, batch, D) and the last state (batch, N, D), chunk by chunk."""
    batch, L, E = dt.shape
    N = A.shape[1]
    dtt, dut = dt.transpose(0, 1), du.transpose(0, 1)  # (L, batch, D) views with contiguous rows
    Bt = time_major_bc(B, batch, E, N, L, "B", states_first=True)  # (L or 1, batch or 1, N, D or 1)
    per_step_C = C.dim() == 3  # (batch, N, L): the readout is a (1 x N) @ (N x D) product per (t, b)
    Cm = C.permute(2, 0, 1).contiguous() if per_step_C else None
    Ct = None if per_step_C else time_major_bc(C, batch, E, N, L, "C", states_first=True)
    A2 = (A * LOG2E).t().contiguous()  # (N, D)
    h = like.new_zeros(batch, N, E)
    y = _Workspace.get("y", (L, batch, E), like)
    chunk = max(1, min(chunk, L))
    abuf, xbuf = (_Workspace.get(name, (chunk, batch, N, E), like) for name in ("a", "x"))
    for s in range(0, L, chunk):
        e = min(s + chunk, L)
        n = e - s
        export = first if s == 0 and first is not None and first.n <= n else None
        B_steps = Bt[..., 0] if export is not None and B.dim() == 3 else None
        a_rows, a = _chunk_decays(dtt, A2, s, e, abuf, export, B_steps, mode)
        x = torch.mul(dut[s:e, :, None, :], Bt[s:e] if Bt.shape[0] > 1 else Bt, out=xbuf[:n])  # Bbar * u
        x = _chunk_recurrence(x, a, a_rows, h, mode)
        h = x[-1].clone()  # the buffer is reused by the next chunk
        if per_step_C:
            torch.bmm(Cm[s:e].view(n * batch, 1, N), x.view(n * batch, N, E), out=y[s:e].view(n * batch, 1, E))
        else:
            torch.sum(x.mul_(Ct[s:e] if Ct.shape[0] > 1 else Ct), dim=2, out=y[s:e])
    return y, h


def scan_inference(u, delta, A, B, C, chunk=CHUNK, mode="sequential", decay_scale=None, delta_bias=None,
                   delta_softplus=False, D=None, z=None, first_steps: _Export | None = None):
    """y (batch, D, L) = (C·h + D*u) * silu(z) and the last state (batch, D, N); inference only (writes
    into reused buffers). Arguments as ``stm_fast.ssm.selective_scan``, already in the compute dtype.

    ``mode``: ``sequential`` (one fused multiply-add per step; the default, fastest measured on CPU) or
    ``doubling``. ``first_steps``: an ``_Export`` filled when its n fits the first chunk and there is no
    decay_scale.
    """
    cl = channel_last(u) and channel_last(delta)
    dt, du = _steps_and_inputs(u, delta, delta_bias, delta_softplus, decay_scale, cl)
    y, h = _states_and_readout(dt, du, A, B, C, chunk, mode, first_steps if decay_scale is None else None, u)
    # the one fresh buffer, returned in u's layout: y plus the skip D*u, times silu(z)
    native = _rows if cl else (lambda t: t)  # noqa: E731
    y = y.transpose(0, 1) if cl else y.permute(1, 2, 0)
    out = u.new_empty(native(u).shape)
    if D is not None:
        torch.addcmul(y, native(u), D if cl else D[:, None], out=out)
    else:
        out.copy_(y)
    if z is not None:
        out.mul_(torch.ops.aten.silu.out(native(z), out=_Workspace.get("z", out.shape, u)))
    return native(out), h.transpose(1, 2)


def doubling_scan(a, x, h):
    """Solve x_t <- a_t * x_{t-1} + x_t along the first axis (x_{-1} = h) in log2(n) rounds, in place."""
    n = x.shape[0]
    x[0].addcmul_(a[0], h)
    off = 1
    while off < n:  # after this round x[t] holds the recurrence over the last 2*off steps
        prev = x[:-off].clone() if off < n - off else x[:-off]
        x[off:].addcmul_(a[off:], prev)
        if 2 * off < n:
            a[off:] = a[off:] * a[:-off]
        off *= 2
    return x


def check(device) -> None:
    """The torch backend runs on every device."""


def scan(call: ScanCall) -> ScanOutput:
    """A ``ScanCall`` on this backend: the chunked inference scan (first steps exported when they fit the
    first chunk and there is no decay_scale), its differentiable twin when the inputs need gradients, a
    reverse call on flipped copies."""
    if call.reverse:
        return reversed_by_flipping(call, scan)
    if call.grad:
        return around_bare_scan(call, scan_differentiable)
    u, delta, A, B, C, D, z, bias, scale = call.tensors()
    export = _Export(call.first_steps) if call.first_steps else None
    y, last = scan_inference(u, delta, A, B, C, decay_scale=scale, delta_bias=bias,
                             delta_softplus=call.delta_softplus, D=D, z=z, first_steps=export)
    first = FirstSteps(export.delta, export.Abar, export.B) if export is not None and export.filled else None
    return ScanOutput(y.to(call.u.dtype), last, first)
