"""What every selective-scan backend shares: argument checks, the B/C layouts, the channel-last test,
log2(e), and the first-steps export (docs/conventions.md §1 for the layouts)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LOG2E", "channel_last", "check_scan_args", "bc_layout", "time_major_bc", "FirstSteps"]

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


@dataclass
class FirstSteps:
    """A request for, and then the result of, the first ``n`` scan steps' delta (after bias and softplus,
    (n, batch, D)), Abar = exp(delta*A) ((n, batch, N, D)) and B ((n, batch, N); None unless B is
    (batch, N, L)), in scan order: values a backend computes anyway and STM's merge weights reuse.

    Buffers may be given (the mixer hands one slice of a two-direction buffer per direction); a backend
    that exports fills them (or allocates) and sets ``filled``. Backends that cannot export leave the
    request untouched, and callers recompute what they need."""

    n: int
    delta: torch.Tensor | None = None
    Abar: torch.Tensor | None = None
    B: torch.Tensor | None = None
    filled: bool = False


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
