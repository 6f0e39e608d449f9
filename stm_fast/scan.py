"""Selective scan (mamba-ssm layout) with interchangeable backends; reference twin: ``stm_ref.ssm.selective_scan``.

Backends:

* ``torch``: pure PyTorch on any device. Time-major and chunked over time: the discretisation, the
  input term and the readout are vectorised over (chunk, batch, channels, states); the recurrence runs
  inside the chunk on cache-resident buffers, and a state is carried between chunks. No log-space
  cumsum, so nothing can overflow (NOTES.md): every factor multiplied is a product of Abar in (0, 1].
* ``triton``: a Triton kernel (CUDA, forward/inference); runs on CPU tensors under ``TRITON_INTERPRET=1``.
* ``mamba_ssm``: mamba-ssm's CUDA ``selective_scan_fn`` when installed.
* ``loop``: one Python iteration per time step, the layout of mamba-ssm's ``selective_scan_ref``;
  the naive floor the benchmarks compare against (never chosen automatically).

``backend=None`` picks ``mamba_ssm`` on CUDA when installed, else ``triton`` on CUDA when importable,
else ``torch``. The environment variable ``STM_SCAN_BACKEND`` overrides the automatic choice.
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading

import torch
import torch.nn.functional as F

__all__ = ["selective_scan", "available_backends", "resolve_backend", "BACKENDS", "BackendUnavailable", "flush_denormals",
           "release_workspace"]

BACKENDS = ("torch", "triton", "mamba_ssm", "loop")
_LOG2E = 1.4426950408889634


class flush_denormals:
    """Within the block, CPU float arithmetic flushes subnormals to zero; the previous mode is restored after.

    Trained Vim decays exp(delta*A) reach float32's subnormal range, where x86 arithmetic is several times
    slower; values below 1e-38 change no prediction. torch has no getter for the mode, so the state this
    module set is tracked here (the process default is off)."""

    _on = False

    def __enter__(self):
        self.prev = flush_denormals._on
        flush_denormals._on = torch.set_flush_denormal(True) or self.prev
        return self

    def __exit__(self, *exc):
        torch.set_flush_denormal(self.prev)
        flush_denormals._on = self.prev
        return False


class BackendUnavailable(RuntimeError):
    """The requested scan backend cannot run here (missing package or wrong device)."""


def _triton_runs_on(device):
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _mamba_ssm_runs_on(device):
    return device.type == "cuda" and importlib.util.find_spec("mamba_ssm") is not None


def available_backends(device="cpu"):
    """Backends that can run on ``device`` in this environment."""
    device = torch.device(device)
    out = ["torch", "loop"]
    if _triton_runs_on(device):
        out.insert(1, "triton")
    if _mamba_ssm_runs_on(device):
        out.insert(0, "mamba_ssm")
    return out


def resolve_backend(backend, device):
    """The backend to use: the argument, else ``STM_SCAN_BACKEND``, else the best available on ``device``."""
    device = torch.device(device)
    name = backend or os.environ.get("STM_SCAN_BACKEND") or None
    if name is None:
        if _mamba_ssm_runs_on(device):
            return "mamba_ssm"
        if device.type == "cuda" and _triton_runs_on(device):
            return "triton"
        return "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown scan backend {name!r}; choose one of {BACKENDS}")
    if name == "triton" and not _triton_runs_on(device):
        raise BackendUnavailable(
            f"scan backend 'triton' cannot run on {device}: it needs a CUDA device with triton installed "
            f"(or TRITON_INTERPRET=1 for CPU tensors, slow, for testing). Use backend='torch' instead.")
    if name == "mamba_ssm" and not _mamba_ssm_runs_on(device):
        raise BackendUnavailable(
            f"scan backend 'mamba_ssm' cannot run on {device}: it needs CUDA and `pip install .[cuda]`. "
            f"Use backend='torch' instead.")
    return name


def _expand_BC(M, batch, D, N, L, name, states_first=False):
    """B or C as a time-major view: (L, batch, D or 1, N), or (L, batch, N, D or 1) with ``states_first``.

    (D, N) constants become (1, 1, D, N) (resp. (1, 1, N, D))."""
    if M.dim() == 2:
        if M.shape != (D, N):
            raise ValueError(f"selective_scan: {name} of shape {tuple(M.shape)}, expected (D, N)={(D, N)}")
        return M.t()[None, None] if states_first else M[None, None]
    if M.dim() == 3:
        if M.shape != (batch, N, L):
            raise ValueError(f"selective_scan: {name} of shape {tuple(M.shape)}, expected (batch, N, L)={(batch, N, L)}")
        return M.permute(2, 0, 1)[..., None] if states_first else M.permute(2, 0, 1)[:, :, None, :]
    if M.dim() == 4:
        G = M.shape[1]
        if D % G or M.shape[0] != batch or M.shape[2:] != (N, L):
            raise ValueError(f"selective_scan: {name} of shape {tuple(M.shape)} does not fit (batch, G, N, L) with D={D}")
        if states_first:
            return M.permute(3, 0, 2, 1).repeat_interleave(D // G, dim=3)
        return M.permute(3, 0, 1, 2).repeat_interleave(D // G, dim=2)
    raise ValueError(f"selective_scan: {name} must have 2, 3 or 4 dimensions, got {M.dim()}")


def _check(u, delta, A):
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"selective_scan: u and delta must both be (batch, D, L), got {tuple(u.shape)}, {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(f"selective_scan: A of shape {tuple(A.shape)} does not match D={u.shape[1]}")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported")


def _compute_dtype(*ts):
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


class _Workspace:
    """Per-thread scratch buffers for the inference scan, grown to the largest request and then sliced.

    Every fresh multi-megabyte CPU buffer is page-faulted in by the kernel on first touch (NOTES.md);
    at Vim-Ti shapes that was about a quarter of the scan's time. Reusing buffers also means that a
    sequence that shrinks layer by layer (token reduction) never reallocates. Only temporaries live
    here: everything returned to the caller is freshly allocated. The buffers stay allocated between
    calls (about 5 * L * batch * D + 2 * 16 * batch * N * D floats: ~18 MB at Vim-Ti batch 8);
    ``release_workspace()`` frees them. Other devices allocate per call (CUDA's caching allocator
    already reuses memory).
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


def release_workspace():
    """Free this thread's scratch buffers of the CPU torch scan (they are reallocated on the next call)."""
    _Workspace.clear()


CHUNK = 16  # time steps per chunk of the torch backend (16-32 measure alike at Vim shapes, 4-8 slower)


def _rows(t):
    """(batch, D, L) -> its (batch, L, D) view: channel-last memory (what Vim's projections produce) gives
    a view whose rows are contiguous; a (batch, D, L)-contiguous tensor gives a strided view."""
    return t.transpose(1, 2)


def _channel_last(t):
    return t.stride(1) == 1 and t.shape[1] > 1 or t.shape[1] == 1


def _scan_torch(u, delta, A, B, C, chunk=CHUNK, mode="sequential", decay_scale=None, delta_bias=None,
                delta_softplus=False, D=None, z=None, head=None):
    """y (batch, D, L) = (C·h + D*u) * silu(z) and the last state (batch, D, N); inference only (writes into
    reused buffers), ``_scan_train`` is the differentiable path.

    Time-major, states-first and chunked over time: the states are held as (chunk, batch, N, D), so
    every op runs along the contiguous channel axis (broadcasts over N or D are row-wise, and the readout
    over N is a small matrix product, not a reduction of 16-element inner rows: ~2x faster than a (D, N)
    layout on CPU). Inputs whose memory is channel-last (Vim's mixer: ``x.stride(1) == 1``) are read as
    (batch, L, D) rows without any transpose, and y comes back in that layout; (batch, D, L)-contiguous
    inputs cost two transposing copies in and one out, and get y contiguous. Per chunk of ``chunk`` steps,
    Abar = exp2(delta*A*log2 e) and Bbar*u are each one vectorised op into reused buffers
    (``_Workspace``). The recurrence inside a chunk is either ``sequential`` (one fused multiply-add per
    step on a contiguous (batch, N, D) slice; the default, fastest measured on CPU) or ``doubling``
    (log2(chunk) Hillis-Steele rounds, no per-step Python; twice the arithmetic). See the README's scan
    notes. ``head``: see ``selective_scan``.
    """
    batch, E, L = u.shape
    N = A.shape[1]
    ws = lambda name, *shape: _Workspace.get(name, shape, u)  # noqa: E731
    # elementwise work happens in the callers' layout ("native": rows if channel-last, else (batch, D, L));
    # only the step and the input term are turned into rows, by one copy each of freshly written data
    # (~2x faster than transposing cold inputs)
    cl = _channel_last(u) and _channel_last(delta)
    native = _rows if cl else (lambda t: t)  # noqa: E731
    per_channel = (lambda v: v) if cl else (lambda v: v[:, None])  # noqa: E731
    dc = ws("dc", *native(u).shape)
    if delta_bias is not None:
        torch.add(native(delta), per_channel(delta_bias), out=dc)
    else:
        dc.copy_(native(delta))
    if delta_softplus:
        torch.ops.aten.softplus.out(dc, 1, 20, out=dc)  # F.softplus's beta and threshold, in place
    du = torch.mul(dc, native(u), out=ws("dun", *dc.shape))
    if cl:
        dt = dc
    else:
        dt, du = ws("dt", batch, L, E).copy_(_rows(dc)), ws("du", batch, L, E).copy_(_rows(du))
    if decay_scale is not None:
        dt.mul_(decay_scale[:, :, None])  # only the step that enters Abar is scaled
    dtt, dut = dt.transpose(0, 1), du.transpose(0, 1)  # (L, batch, D) views with contiguous rows
    Bt = _expand_BC(B, batch, E, N, L, "B", states_first=True)  # (L or 1, batch or 1, N, D or 1)
    per_step_C = C.dim() == 3  # (batch, N, L): the readout is a (1 x N) @ (N x D) product per (t, b)
    Cm = C.permute(2, 0, 1).contiguous() if per_step_C else None
    Ct = None if per_step_C else _expand_BC(C, batch, E, N, L, "C", states_first=True)
    A2 = (A * _LOG2E).t().contiguous()  # (N, D); exp2 is markedly faster than exp on CPU (NOTES.md)
    h = u.new_zeros(batch, N, E)
    y = ws("y", L, batch, E)
    chunk = max(1, min(chunk, L))
    abuf = ws("a", chunk, batch, N, E)
    xbuf = ws("x", chunk, batch, N, E)
    for s in range(0, L, chunk):
        e = min(s + chunk, L)
        n = e - s
        k = head["n"] if s == 0 and head is not None and decay_scale is None and head["n"] <= n else 0
        if k:  # the first k steps' Abar go straight into the export buffer (no copy), the rest into the chunk's
            hd, ha, hB = head.get("out") or (u.new_empty(k, batch, E), u.new_empty(k, batch, N, E), u.new_empty(k, batch, N))
            head.update(delta=hd.copy_(dtt[:k]), Abar=torch.mul(dtt[:k, :, None, :], A2, out=ha).exp2_(),
                        B=hB.copy_(Bt[:k, :, :, 0]) if B.dim() == 3 else None)
            a = torch.mul(dtt[k:e, :, None, :], A2, out=abuf[k:n]).exp2_()
            a_rows = ha.unbind(0) + a.unbind(0)
            a = abuf[:n].copy_(torch.cat([ha, a])) if mode == "doubling" else None
        else:
            a = torch.mul(dtt[s:e, :, None, :], A2, out=abuf[:n]).exp2_()  # Abar
            a_rows = a.unbind(0)
        x = torch.mul(dut[s:e, :, None, :], Bt[s:e] if Bt.shape[0] > 1 else Bt, out=xbuf[:n])  # Bbar * u
        if mode == "sequential":
            for xt, at in zip(x.unbind(0), a_rows):
                xt.addcmul_(at, h)
                h = xt
        elif mode == "doubling":
            x = _doubling_scan(a, x, h)
        else:
            raise ValueError(f"mode must be 'sequential' or 'doubling', got {mode!r}")
        h = x[-1].clone()  # the buffer is reused by the next chunk
        if per_step_C:
            torch.bmm(Cm[s:e].view(n * batch, 1, N), x.view(n * batch, N, E), out=y[s:e].view(n * batch, 1, E))
        else:
            torch.sum(x.mul_(Ct[s:e] if Ct.shape[0] > 1 else Ct), dim=2, out=y[s:e])
    # the one fresh buffer, returned to the caller in u's layout: y plus the skip D*u, times silu(z)
    y = y.transpose(0, 1) if cl else y.permute(1, 2, 0)
    out = u.new_empty(native(u).shape)
    if D is not None:
        torch.addcmul(y, native(u), per_channel(D), out=out)
    else:
        out.copy_(y)
    if z is not None:
        out.mul_(torch.ops.aten.silu.out(native(z), out=ws("z", *out.shape)))
    return native(out), h.transpose(1, 2)


def _scan_train(u, delta, A, B, C, decay_scale=None):
    """Differentiable twin of ``_scan_torch``: y_ssm (batch, D, L) = C·h and the last state; delta already
    biased/softplused. A forward that keeps the states and a hand-written reverse scan for the backward,
    instead of one autograd node per time step (much slower on CPU, NOTES.md)."""
    batch, E, L = u.shape
    N = A.shape[1]
    du = (delta * u).permute(2, 0, 1)
    dt = (delta if decay_scale is None else delta * decay_scale[:, None, :]).permute(2, 0, 1)
    Bt = _expand_BC(B, batch, E, N, L, "B")
    Ct = _expand_BC(C, batch, E, N, L, "C")
    Bf = Bt.expand(L, batch, E, N) if Bt.shape[1:] != (batch, E, N) else Bt
    Cf = Ct.expand(L, batch, E, N) if Ct.shape[1:] != (batch, E, N) else Ct
    y, h = _ScanFn.apply(dt.contiguous(), du.contiguous(), A, Bf, Cf)
    return y.permute(1, 2, 0), h


class _ScanFn(torch.autograd.Function):
    """y_t = C_t · h_t, h_t = exp(dt_t A) h_{t-1} + du_t B_t over time-major inputs, with an explicit backward.

    dt, du: (L, batch, D); A: (D, N); B, C: (L, batch, D or 1, N). Returns y (L, batch, D) and the last state.
    """

    @staticmethod
    def forward(ctx, dt, du, A, B, C):
        a = torch.exp(dt[..., None] * A)  # (L, batch, D, N)
        x = du[..., None] * B
        H = torch.empty_like(x)
        h = torch.zeros_like(x[0])
        for t in range(x.shape[0]):
            h = torch.addcmul(x[t], a[t], h)
            H[t] = h
        y = (H * C).sum(-1)
        ctx.save_for_backward(dt, du, A, B, C, a, H)
        return y, h

    @staticmethod
    def backward(ctx, gy, gh_last):
        dt, du, A, B, C, a, H = ctx.saved_tensors
        L = H.shape[0]
        e = gy[..., None] * C  # direct gradient of each state through its readout
        G = torch.empty_like(H)
        g = gh_last.clone() if gh_last is not None else torch.zeros_like(H[0])
        for t in range(L - 1, -1, -1):  # g_t = e_t + a_{t+1} g_{t+1}
            g = e[t] + g if t == L - 1 else torch.addcmul(e[t], a[t + 1], g)
            G[t] = g
        H_prev = torch.cat([torch.zeros_like(H[:1]), H[:-1]], dim=0)
        ga = G * H_prev * a  # gradient w.r.t. (dt * A), elementwise
        g_dt = (ga * A).sum(-1)
        g_A = (ga * dt[..., None]).sum(dim=(0, 1))
        gx = G
        g_du = (gx * B).sum(-1)
        g_B = gx * du[..., None]
        g_C = gy[..., None] * H
        return g_dt, g_du, g_A, g_B, g_C  # B, C arrive expanded to (L, batch, D, N): autograd sums the broadcast


def _doubling_scan(a, x, h):
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


def _scan_loop(u, delta, A, B, C, decay_scale=None):
    """One iteration per time step over precomputed (batch, D, L, N) tensors, as selective_scan_ref does."""
    batch, D, L = u.shape
    N = A.shape[1]
    Bt = _expand_BC(B, batch, D, N, L, "B").expand(L, batch, D, N)
    Ct = _expand_BC(C, batch, D, N, L, "C").expand(L, batch, D, N)
    dA = delta if decay_scale is None else delta * decay_scale[:, None, :]
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", dA, A))
    deltaB_u = torch.einsum("bdl,lbdn,bdl->bdln", delta, Bt, u)
    h = u.new_zeros(batch, D, N)
    ys = []
    for i in range(L):
        h = deltaA[:, :, i] * h + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bdn->bd", h, Ct[i]))
    return torch.stack(ys, dim=2), h


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend=None, decay_scale=None, head=None):
    """Selective scan with mamba-ssm's layout and semantics (twin of ``stm_ref.ssm.selective_scan``).

    ``u, delta, z``: (batch, D, L); ``A``: (D, N); ``B, C``: (batch, N, L), (batch, G, N, L) or (D, N);
    ``D, delta_bias``: (D,). delta <- softplus(delta + delta_bias) when asked; Abar = exp(delta*A),
    Bbar = delta*B (Euler, as Mamba's kernels); y = (C·h + D*u) * silu(z). Computes in float32
    (float64 if any input is float64) and returns y in u's dtype, plus the last state if asked.
    ``decay_scale`` (batch, L): Abar = exp(scale * delta * A), Bbar unchanged (pruned-sequence alignment);
    mamba-ssm's kernel has no such input, so the automatic choice skips it then.
    ``head``: None, or a dict {"n": n} into which the torch backend puts the first n scan steps' delta
    (after bias and softplus; (n, batch, D)), Abar = exp(delta*A) ((n, batch, N, D)) and B ((n, batch, N);
    None unless B is (batch, N, L)), values it computes
    anyway, for STM's merge weights to reuse (when n fits one chunk and there is no decay_scale; otherwise,
    and on the other backends, the dict is left as it was); with {"n": n, "out": (delta_buf, Abar_buf, B_buf)}
    it writes them into those buffers.
    """
    _check(u, delta, A)
    if decay_scale is not None and backend is None and os.environ.get("STM_SCAN_BACKEND") in (None, "", "mamba_ssm"):
        backend = "triton" if u.is_cuda and _triton_runs_on(u.device) else "torch"
    name = resolve_backend(backend, u.device)
    if name == "mamba_ssm" and decay_scale is not None:
        raise BackendUnavailable("scan backend 'mamba_ssm' has no decay_scale input; use 'triton' or 'torch'")
    if name == "mamba_ssm":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "triton":
        from .triton_scan import selective_scan_triton

        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                     decay_scale=decay_scale)
    dtype_in = u.dtype
    ct = _compute_dtype(u, delta, A, B, C)
    cast = lambda t: None if t is None else t.to(ct)  # noqa: E731
    uc, dc = u.to(ct), delta.to(ct)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (u, delta, A, B, C, D, z, delta_bias, decay_scale))
    if name == "torch" and not grad:  # bias, softplus, D and z fused into the buffered inference scan
        y, last = _scan_torch(uc, dc, cast(A), cast(B), cast(C), decay_scale=cast(decay_scale),
                              delta_bias=cast(delta_bias), delta_softplus=delta_softplus, D=cast(D), z=cast(z),
                              head=head)
    else:
        if delta_bias is not None:
            dc = dc + delta_bias.to(ct)[None, :, None]
        if delta_softplus:
            dc = F.softplus(dc)
        scan = _scan_loop if name == "loop" else _scan_train
        y, last = scan(uc, dc, A.to(ct), B.to(ct), C.to(ct), decay_scale=cast(decay_scale))
        if D is not None:
            y = y + D.to(ct)[None, :, None] * uc
        if z is not None:
            y = y * F.silu(z.to(ct))
    y = y.to(dtype_in)
    return (y, last) if return_last_state else y
