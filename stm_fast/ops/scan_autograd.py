"""The differentiable selective scan (training): a forward that keeps the states and a hand-written
reverse scan for the backward, instead of one autograd node per time step (much slower on CPU).

Twin of ``stm_fast.ops.scan_torch.scan_inference`` for inputs that need gradients; reference twin:
``stm_ref.ssm.selective_scan``. delta arrives already biased and softplused; D and z are applied by the
caller (``stm_fast.ssm``).
"""

from __future__ import annotations

import torch

from .common import time_major_bc

__all__ = ["scan_differentiable", "ScanFunction"]


def scan_differentiable(u, delta, A, B, C, decay_scale=None):
    """y_ssm (batch, D, L) = C·h and the last state (batch, D, N), differentiable in every input (eq. 3)."""
    batch, E, L = u.shape
    N = A.shape[1]
    du = (delta * u).permute(2, 0, 1)
    dt = (delta if decay_scale is None else delta * decay_scale[:, None, :]).permute(2, 0, 1)
    Bt = time_major_bc(B, batch, E, N, L, "B")
    Ct = time_major_bc(C, batch, E, N, L, "C")
    Bf = Bt.expand(L, batch, E, N) if Bt.shape[1:] != (batch, E, N) else Bt
    Cf = Ct.expand(L, batch, E, N) if Ct.shape[1:] != (batch, E, N) else Ct
    y, h = ScanFunction.apply(dt.contiguous(), du.contiguous(), A, Bf, Cf)
    return y.permute(1, 2, 0), h


class ScanFunction(torch.autograd.Function):
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
        g_du = (G * B).sum(-1)
        g_B = G * du[..., None]
        g_C = gy[..., None] * H
        return g_dt, g_du, g_A, g_B, g_C  # B, C arrive expanded to (L, batch, D, N): autograd sums the broadcast
