"""What every selective-scan backend shares: the call and its result (``ScanCall``, ``ScanOutput``,
``FirstSteps``), argument checks, the B/C layouts, the channel-last test, log2(e), and the two generic
ways to run a call: on time-flipped copies (``reversed_by_flipping``) and with bias/softplus before and
the D skip and z gate after a bare scan (``around_bare_scan``). docs/conventions.md §1 for the layouts."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["LOG2E", "channel_last", "check_scan_args", "bc_layout", "time_major_bc", "FirstSteps", "ScanCall",
           "ScanOutput", "reversed_by_flipping", "around_bare_scan"]

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)); exp2 is markedly faster than exp on CPU


def channel_last(t: torch.Tensor) -> bool:
    """Whether a (batch, channels, L) tensor is held as (batch, L, channels) rows in memory (Vim's mixer
    makes x, z, delta, B and C that way); a single channel counts as either layout."""
    return t.shape[1] == 1 or t.stride(1) == 1


def check_scan_args(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor) -> None:
    """Clear errors for the shapes every backend relies on: u, delta (batch, D, L), A (D, N), real A."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"selective_scan: u and delta must both be (batch, D, L), got {tuple(u.shape)}, {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(f"selective_scan: A of shape {tuple(A.shape)} does not match D={u.shape[1]}")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported")


def bc_layout(M: torch.Tensor, batch: int, D: int, N: int, L: int, name: str) -> str:
    """The layout of a B or C argument, checked: 'fixed' (D, N), 'variable' (batch, N, L) or 'grouped'
    (batch, G, N, L) with D % G == 0 (channel d reads group d // (D // G)). ValueError otherwise."""
    if M.dim() == 2:
        if M.shape != (D, N):
            raise ValueError(f"selective_scan: {name} of shape {tuple(M.shape)}, expected (D, N)={(D, N)}")
        return "fixed"
    if M.dim() == 3:
        if M.shape != (batch, N, L):
            raise ValueError(f"selective_scan: {name} of shape {tuple(M.shape)}, expected (batch, N, L)={(batch, N, L)}")
        return "variable"
    if M.dim() == 4:
        if D % M.shape[1] or M.shape[0] != batch or M.shape[2:] != (N, L):
            raise ValueError(f"selective_scan: {name} of shape {tuple(M.shape)} does not fit (batch, G, N, L) with D={D}")
        return "grouped"
    raise ValueError(f"selective_scan: {name} must have 2, 3 or 4 dimensions, got {M.dim()}")


@dataclass(frozen=True)
class FirstSteps:
    """The first n scan steps' delta (after bias and softplus, (n, batch, D)), Abar = exp(delta*A)
    ((n, batch, N, D)) and B ((n, batch, N), or None unless B is (batch, N, L)), in scan order: values a
    backend computes anyway, returned with its output so that STM's merge weights can reuse them."""

    delta: torch.Tensor
    Abar: torch.Tensor
    B: torch.Tensor | None


@dataclass(frozen=True, kw_only=True)
class ScanCall:
    """One selective-scan call, as ``stm_fast.ssm.selective_scan`` received it (mamba-ssm's layout), with
    ``reverse`` (scan t = L-1 .. 0, outputs still indexed by t), ``first_steps`` (export the first n scan
    steps; 0: none), ``last_state`` (return the final state), ``grad`` (whether the inputs need gradients)
    and ``dtype`` (the compute dtype). Built with keywords only."""

    u: torch.Tensor
    delta: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor | None = None
    z: torch.Tensor | None = None
    delta_bias: torch.Tensor | None = None
    delta_softplus: bool = False
    decay_scale: torch.Tensor | None = None
    reverse: bool = False
    first_steps: int = 0
    last_state: bool = False
    grad: bool = False
    dtype: torch.dtype = torch.float32

    def tensors(self):
        """(u, delta, A, B, C, D, z, delta_bias, decay_scale), each in the compute dtype (None stays None)."""
        return tuple(None if t is None else t.to(self.dtype) for t in (
            self.u, self.delta, self.A, self.B, self.C, self.D, self.z, self.delta_bias, self.decay_scale))


@dataclass(frozen=True)
class ScanOutput:
    """y (batch, D, L) in u's dtype, the last state (batch, D, N) in the compute dtype (None unless the call
    asked for it and the path does not have it anyway), and the first steps (or None when the call asked for
    none or the backend does not export them)."""

    y: torch.Tensor
    last: torch.Tensor | None = None
    first: FirstSteps | None = None


def reversed_by_flipping(call: ScanCall, scan: Callable[[ScanCall], ScanOutput]) -> ScanOutput:
    """A reverse call run as the forward scan of time-flipped copies, its output flipped back (the first
    steps are the flipped scan's, which are the reverse scan's first steps)."""
    flip = lambda t: None if t is None or t.dim() < 3 else t.flip(-1)  # noqa: E731  (B/C of (D, N) stay)
    scale = None if call.decay_scale is None else call.decay_scale.flip(-1)
    out = scan(replace(call, u=flip(call.u), delta=flip(call.delta), B=flip(call.B), C=flip(call.C), z=flip(call.z),
                       decay_scale=scale, reverse=False))
    return replace(out, y=out.y.flip(-1))


def around_bare_scan(call: ScanCall, bare: Callable) -> ScanOutput:
    """A call through a scan of (u, delta, A, B, C, decay_scale) -> (C.h, last state), the paths without a
    fused epilogue (training, the loop floor): bias and softplus before, the D*u skip and z gate after."""
    u, delta, A, B, C, D, z, bias, scale = call.tensors()
    if bias is not None:
        delta = delta + bias[None, :, None]
    if call.delta_softplus:
        delta = F.softplus(delta)
    y, last = bare(u, delta, A, B, C, decay_scale=scale)
    if D is not None:
        y = y + D[None, :, None] * u
    if z is not None:
        y = y * F.silu(z)
    return ScanOutput(y.to(call.u.dtype), last)


def time_major_bc(M: torch.Tensor, batch: int, D: int, N: int, L: int, name: str,
                  states_first: bool = False) -> torch.Tensor:
    """B or C as a time-major view: (L, batch, D or 1, N), or (L, batch, N, D or 1) with ``states_first``;
    (D, N) constants become (1, 1, D, N) (resp. (1, 1, N, D)). Grouped layouts are expanded per channel."""
    layout = bc_layout(M, batch, D, N, L, name)
    if layout == "fixed":
        return M.t()[None, None] if states_first else M[None, None]
    if layout == "variable":
        return M.permute(2, 0, 1)[..., None] if states_first else M.permute(2, 0, 1)[:, :, None, :]
    per_group = D // M.shape[1]
    if states_first:
        return M.permute(3, 0, 2, 1).repeat_interleave(per_group, dim=3)
    return M.permute(3, 0, 1, 2).repeat_interleave(per_group, dim=2)
