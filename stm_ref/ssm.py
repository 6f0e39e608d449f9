"""The discrete selective SSM of one Mamba direction, in float64 NumPy (paper eq. 2-5).

Shapes follow docs/conventions.md §1 for one sequence of one direction:

    u, delta : (L, D)      A : (D, N)      B, C : (L, N)
    Abar, Bbar, h : (L, D, N)

Everything here is written to be obviously correct rather than fast: explicit loops over time,
explicit products, no log-space tricks. ``scan`` and ``scan_closed_form`` are two independent
computations of the same hidden states and are tested against each other.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "discretize",
    "decay_product",
    "scan",
    "scan_closed_form",
    "readout",
    "hidden_attention",
    "softplus",
    "silu",
    "selective_scan",
]


def _f64(x, name):
    a = np.asarray(x)
    if np.iscomplexobj(a):
        raise ValueError(f"{name}: complex inputs are not supported by the float64 reference")
    return a.astype(np.float64, copy=False)


def _phi1(z):
    """expm1(z) / z with its limit 1 at z = 0 (the ZOH factor, stable for tiny |z|)."""
    z = np.asarray(z, dtype=np.float64)
    small = np.abs(z) < 1e-8
    safe = np.where(small, 1.0, z)
    # Second-order Taylor term below 1e-8 is < 1e-16 relative: exact in float64.
    return np.where(small, 1.0 + 0.5 * z, np.expm1(safe) / safe)


def discretize(delta, A, B, method="zoh"):
    """Discretise (delta, A, B) into (Abar, Bbar): eq. 2 (``zoh``) or Mamba's kernels (``euler``).

    ``delta``: (L, D), > 0. ``A``: (D, N), < 0 (A = 0 is allowed and gives Bbar = delta*B for ZOH).
    ``B``: (L, N) input-dependent, or (D, N) input-independent, or (L, D, N) fully general.
    Returns ``Abar = exp(delta*A)`` and, for ``zoh``, ``Bbar = (exp(delta*A) - 1) / A * B``
    (computed as ``delta * expm1(delta*A)/(delta*A) * B`` so it is exact as A -> 0);
    for ``euler``, ``Bbar = delta * B``. Both of shape (L, D, N).
    """
    delta = _f64(delta, "delta")
    A = _f64(A, "A")
    B = _f64(B, "B")
    if delta.ndim != 2 or A.ndim != 2 or delta.shape[1] != A.shape[0]:
        raise ValueError(f"discretize: expected delta (L, D) and A (D, N), got {delta.shape} and {A.shape}")
    L, D = delta.shape
    N = A.shape[1]
    if B.shape == (L, N):
        Bf = B[:, None, :]
    elif B.shape == (D, N) and (L, N) != (D, N):
        Bf = B[None, :, :]
    elif B.shape == (L, D, N):
        Bf = B
    else:
        raise ValueError(f"discretize: B must be (L, N)={L, N}, (D, N)={D, N} or (L, D, N), got {B.shape}")
    dA = delta[:, :, None] * A[None, :, :]
    Abar = np.exp(dA)
    if method == "zoh":
        Bbar = delta[:, :, None] * _phi1(dA) * Bf
    elif method == "euler":
        Bbar = delta[:, :, None] * Bf
    else:
        raise ValueError(f"discretize: method must be 'zoh' or 'euler', got {method!r}")
    return Abar, np.broadcast_to(Bbar, (L, D, N)).copy()


def decay_product(Abar, j, t):
    """Product of Abar over the steps strictly after j up to and including t, in scan order.

    For j <= t (forward scan) that is ``prod_{k=j+1..t} Abar_k`` (eq. 4's factor); for j > t
    (a backward scan, which visits t after j) it is ``prod_{k=t..j-1} Abar_k``. Empty product = 1.
    """
    Abar = np.asarray(Abar, dtype=np.float64)
    if j <= t:
        steps = Abar[j + 1 : t + 1]
    else:
        steps = Abar[t:j]
    return np.prod(steps, axis=0) if len(steps) else np.ones(Abar.shape[1:])


def _scan_inputs(Abar, Bbar, u):
    """float64 arrays, with a per-channel token u (L, D) viewed as (L, D, 1)."""
    u = _f64(u, "u")
    return _f64(Abar, "Abar"), _f64(Bbar, "Bbar"), (u[:, :, None] if u.ndim == 2 else u)


def scan(Abar, Bbar, u, h0=None):
    """Hidden states by the recurrence h_t = Abar_t * h_{t-1} + Bbar_t * u_t (eq. 3), t = 0..L-1.

    ``u`` is (L, D) (a token per channel) or (L, D, N) (a hidden-space input, as the exact merge
    of eq. 20 produces). ``h0``: (D, N) initial state, zeros by default. Returns h: (L, D, N).
    """
    Abar, Bbar, u = _scan_inputs(Abar, Bbar, u)
    L = Abar.shape[0]
    h = np.zeros(Abar.shape, dtype=np.float64)
    prev = np.zeros(Abar.shape[1:]) if h0 is None else _f64(h0, "h0")
    for t in range(L):
        prev = Abar[t] * prev + Bbar[t] * u[t]
        h[t] = prev
    return h


def scan_closed_form(Abar, Bbar, u):
    """Hidden states by the closed form h_t = sum_{j<=t} (prod_{k=j+1..t} Abar_k) Bbar_j u_j (eq. 4).

    Computed term by term from explicit products, independently of ``scan``.
    """
    Abar, Bbar, u = _scan_inputs(Abar, Bbar, u)
    L = Abar.shape[0]
    h = np.zeros(Abar.shape, dtype=np.float64)
    for t in range(L):
        for j in range(t + 1):
            h[t] += decay_product(Abar, j, t) * Bbar[j] * u[j]
    return h


def readout(h, C, u=None, D=None):
    """Output y_t = sum_s C_t h_t (+ D * u_t) (eq. 3). ``C``: (L, N) or (L, D, N). Returns (L, D)."""
    h = _f64(h, "h")
    C = _f64(C, "C")
    Cf = C[:, None, :] if C.ndim == 2 else C
    y = np.sum(Cf * h, axis=-1)
    if D is not None:
        if u is None:
            raise ValueError("readout: the skip term D*u needs u")
        y = y + _f64(D, "D")[None, :] * _f64(u, "u")
    return y


def hidden_attention(Abar, Bbar, C):
    """Hidden attention alpha[d, t, j] = sum_s C_t (prod_{k=j+1..t} Abar_k) Bbar_j for j <= t (eq. 5).

    Zero above the diagonal (causal). With it, y[:, d] = alpha[d] @ u[:, d] for each channel.
    Returns (D, L, L).
    """
    Abar = _f64(Abar, "Abar")
    Bbar = _f64(Bbar, "Bbar")
    C = _f64(C, "C")
    L, D, N = Abar.shape
    Cf = C[:, None, :] if C.ndim == 2 else C
    alpha = np.zeros((D, L, L))
    for t in range(L):
        for j in range(t + 1):
            alpha[:, t, j] = np.sum(Cf[t] * decay_product(Abar, j, t) * Bbar[j], axis=-1)
    return alpha


def softplus(x):
    """torch.nn.functional.softplus semantics (beta=1, threshold=20): x itself where x > 20."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


def silu(x):
    x = np.asarray(x, dtype=np.float64)
    return x / (1.0 + np.exp(-x))


def _per_position(M, b, L, D, N, name):
    """A B or C argument of ``selective_scan`` for batch item b as a (L, D, N) array."""
    if M.ndim == 2:  # (D, N): input-independent
        if M.shape != (D, N):
            raise ValueError(f"selective_scan: {name} of shape {M.shape}, expected (D, N)={D, N}")
        return np.broadcast_to(M[None], (L, D, N))
    if M.ndim == 3:  # (batch, N, L)
        if M.shape[1:] != (N, L):
            raise ValueError(f"selective_scan: {name} of shape {M.shape}, expected (batch, N, L)")
        return np.broadcast_to(M[b].T[:, None, :], (L, D, N))
    if M.ndim == 4:  # (batch, G, N, L): channel groups, D // G channels share one B/C
        G = M.shape[1]
        if D % G or M.shape[2:] != (N, L):
            raise ValueError(f"selective_scan: {name} of shape {M.shape} does not fit D={D}, N={N}, L={L}")
        per_group = np.transpose(M[b], (2, 0, 1))  # (L, G, N)
        return np.repeat(per_group, D // G, axis=1)
    raise ValueError(f"selective_scan: {name} must have 2, 3 or 4 dimensions, got {M.ndim}")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, decay_scale=None):
    """Batched selective scan with the argument layouts and semantics of mamba-ssm's ``selective_scan_ref``.

    ``u, delta, z``: (batch, D, L); ``A``: (D, N); ``B, C``: (batch, N, L), (batch, G, N, L) or (D, N);
    ``D, delta_bias``: (D,). delta <- softplus(delta + delta_bias) when asked; Euler discretisation
    (Abar = exp(delta*A), Bbar = delta*B, as Mamba's kernels); y = (C·h + D*u) * silu(z).
    Returns y (batch, D, L) and, with ``return_last_state``, the final state (batch, D, N).
    Unlike mamba-ssm's reference, everything stays in float64 (no float32 cast).
    ``decay_scale`` (batch, L), an extension for pruned sequences: Abar_t = exp(scale_t * delta_t * A)
    while Bbar_t = delta_t * B_t (the decay spans the positions a pruned token left behind).
    """
    u = _f64(u, "u")
    delta = _f64(delta, "delta")
    A = _f64(A, "A")
    B = _f64(B, "B")
    C = _f64(C, "C")
    if u.ndim != 3 or delta.shape != u.shape:
        raise ValueError(f"selective_scan: u and delta must both be (batch, D, L), got {u.shape}, {delta.shape}")
    batch, Dm, L = u.shape
    if A.shape[0] != Dm:
        raise ValueError(f"selective_scan: A of shape {A.shape} does not match D={Dm}")
    N = A.shape[1]
    if delta_bias is not None:
        delta = delta + _f64(delta_bias, "delta_bias")[None, :, None]
    if delta_softplus:
        delta = softplus(delta)
    ys = np.zeros((batch, Dm, L))
    last = np.zeros((batch, Dm, N))
    for b in range(batch):
        Abar, Bbar = discretize(delta[b].T, A, _per_position(B, b, L, Dm, N, "B"), method="euler")
        if decay_scale is not None:
            Abar = np.exp(np.asarray(decay_scale, dtype=np.float64)[b][:, None, None] * delta[b].T[:, :, None] * A[None])
        h = scan(Abar, Bbar, u[b].T)
        y = readout(h, _per_position(C, b, L, Dm, N, "C"))
        ys[b] = y.T
        last[b] = h[-1]
    out = ys if D is None else ys + _f64(D, "D")[None, :, None] * u
    if z is not None:
        out = out * silu(_f64(z, "z"))
    return (out, last) if return_last_state else out
