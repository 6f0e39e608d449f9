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
import os

import torch
import torch.nn.functional as F

__all__ = ["selective_scan", "available_backends", "resolve_backend", "BACKENDS", "BackendUnavailable", "flush_denormals"]

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


def _expand_BC(M, batch, D, N, L, name):
    """B or C as a time-major (L, batch, D or 1, N) view; (D, N) constants become (1, 1, D, N)."""
    if M.dim() == 2:
        if M.shape != (D, N):
            raise ValueError(f"selective_scan: {name} of shape {tuple(M.shape)}, expected (D, N)={(D, N)}")
        return M[None, None]
    if M.dim() == 3:
        if M.shape != (batch, N, L):
            raise ValueError(f"selective_scan: {name} of shape {tuple(M.shape)}, expected (batch, N, L)={(batch, N, L)}")
        return M.permute(2, 0, 1)[:, :, None, :]
    if M.dim() == 4:
        G = M.shape[1]
        if D % G or M.shape[0] != batch or M.shape[2:] != (N, L):
            raise ValueError(f"selective_scan: {name} of shape {tuple(M.shape)} does not fit (batch, G, N, L) with D={D}")
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


def _scan_torch(u, delta, A, B, C, chunk=8, mode="sequential", decay_scale=None):
    """y_ssm (batch, D, L) = C·h and the last state (batch, D, N); delta already biased/softplused.

    Time-major and chunked: per chunk of ``chunk`` steps, Abar = exp2(delta*A*log2 e), Bbar*u and the
    readout C·h are each one vectorised op over (chunk, batch, D, N), on buffers that stay in cache.
    The recurrence inside a chunk is either ``sequential`` (one fused multiply-add per step on a
    contiguous (batch, D, N) slice; the default, fastest measured on CPU) or ``doubling`` (log2(chunk)
    Hillis-Steele rounds, no per-step Python; twice the arithmetic). See the README's scan notes.
    """
    batch, D, L = u.shape
    N = A.shape[1]
    Bt = _expand_BC(B, batch, D, N, L, "B")
    Ct = _expand_BC(C, batch, D, N, L, "C")
    du = (delta * u).permute(2, 0, 1).contiguous()
    if decay_scale is not None:
        delta = delta * decay_scale[:, None, :]
    dt = delta.permute(2, 0, 1).contiguous()  # (L, batch, D), the step that enters Abar
    A2 = A * _LOG2E  # exp2 is markedly faster than exp on CPU (NOTES.md)
    h = u.new_zeros(batch, D, N)
    # In-place updates into reused buffers are much faster on CPU but break autograd; training takes
    # the functional path (same arithmetic).
    if torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C)):
        # Training: a forward that keeps the states and a hand-written reverse scan for the backward,
        # instead of recording one autograd node per time step (much slower on CPU, NOTES.md).
        Bf = Bt.expand(L, batch, D, N) if Bt.shape[1:] != (batch, D, N) else Bt
        Cf = Ct.expand(L, batch, D, N) if Ct.shape[1:] != (batch, D, N) else Ct
        y, h = _ScanFn.apply(dt, du, A, Bf, Cf)
        return y.permute(1, 2, 0), h
    y = u.new_empty(L, batch, D)
    abuf = u.new_empty(chunk, batch, D, N)
    xbuf = u.new_empty(chunk, batch, D, N)
    for s in range(0, L, chunk):
        e = min(s + chunk, L)
        n = e - s
        a = torch.mul(dt[s:e, :, :, None], A2, out=abuf[:n]).exp2_()  # Abar
        x = torch.mul(du[s:e, :, :, None], Bt[s:e] if Bt.shape[0] > 1 else Bt, out=xbuf[:n])  # Bbar * u
        if mode == "sequential":
            for t in range(n):
                x[t].addcmul_(a[t], h)
                h = x[t]
        elif mode == "doubling":
            x = _doubling_scan(a, x, h)
        else:
            raise ValueError(f"mode must be 'sequential' or 'doubling', got {mode!r}")
        h = x[-1].clone()  # the buffer is reused by the readout and the next chunk
        torch.sum(x.mul_(Ct[s:e] if Ct.shape[0] > 1 else Ct), dim=-1, out=y[s:e])
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
                   return_last_state=False, backend=None, decay_scale=None):
    """Selective scan with mamba-ssm's layout and semantics (twin of ``stm_ref.ssm.selective_scan``).

    ``u, delta, z``: (batch, D, L); ``A``: (D, N); ``B, C``: (batch, N, L), (batch, G, N, L) or (D, N);
    ``D, delta_bias``: (D,). delta <- softplus(delta + delta_bias) when asked; Abar = exp(delta*A),
    Bbar = delta*B (Euler, as Mamba's kernels); y = (C·h + D*u) * silu(z). Computes in float32
    (float64 if any input is float64) and returns y in u's dtype, plus the last state if asked.
    ``decay_scale`` (batch, L): Abar = exp(scale * delta * A), Bbar unchanged (pruned-sequence alignment);
    mamba-ssm's kernel has no such input, so the automatic choice skips it then.
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
    uc, dc = u.to(ct), delta.to(ct)
    if delta_bias is not None:
        dc = dc + delta_bias.to(ct)[None, :, None]
    if delta_softplus:
        dc = F.softplus(dc)
    scan = _scan_torch if name == "torch" else _scan_loop
    y, last = scan(uc, dc, A.to(ct), B.to(ct), C.to(ct),
                   decay_scale=None if decay_scale is None else decay_scale.to(ct))
    if D is not None:
        y = y + D.to(ct)[None, :, None] * uc
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(dtype_in)
    return (y, last) if return_last_state else y
