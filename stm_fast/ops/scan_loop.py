"""The ``loop`` selective-scan backend: one Python iteration per time step over precomputed (batch, D, L, N)
tensors, the layout of mamba-ssm's ``selective_scan_ref``. The naive floor the benchmarks compare
against; never chosen automatically. Reference twin: ``stm_ref.ssm.selective_scan``."""

from __future__ import annotations

import torch

from .conv import conv  # noqa: F401  (this backend's conv: the torch one)
from .common import ScanCall, ScanOutput, around_bare_scan, reversed_by_flipping, time_major_bc

__all__ = ["scan_loop", "scan", "check", "conv"]


def scan_loop(u, delta, A, B, C, decay_scale=None):
    """y_ssm (batch, D, L) = C·h and the last state (batch, D, N); delta already biased and softplused."""
    batch, D, L = u.shape
    N = A.shape[1]
    Bt = time_major_bc(B, batch, D, N, L, "B").expand(L, batch, D, N)
    Ct = time_major_bc(C, batch, D, N, L, "C").expand(L, batch, D, N)
    dA = delta if decay_scale is None else delta * decay_scale[:, None, :]
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", dA, A))
    deltaB_u = torch.einsum("bdl,lbdn,bdl->bdln", delta, Bt, u)
    h = u.new_zeros(batch, D, N)
    ys = []
    for i in range(L):
        h = deltaA[:, :, i] * h + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bdn->bd", h, Ct[i]))
    return torch.stack(ys, dim=2), h


def check(device) -> None:
    """The loop runs on every device."""




def scan(call: ScanCall) -> ScanOutput:
    """A ``ScanCall`` through the per-step loop (a reverse call on flipped copies; no first steps)."""
    if call.reverse:
        return reversed_by_flipping(call, scan)
    return around_bare_scan(call, scan_loop)
