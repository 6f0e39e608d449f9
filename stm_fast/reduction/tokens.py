"""Per-image bookkeeping of a reduced token stream, and the gathers the pruning/merging steps share."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

__all__ = ["TokenState", "gather_tokens", "kept_from_mask"]


@dataclass(frozen=True)
class TokenState:
    """Where the tokens of the current stream came from, per image (docs/conventions.md §5).

    ``cls`` (batch,): the class token's index now; ``shared_cls``: that index as an int when the host knows,
    without reading ``cls``, that it is the same for every image (then reading it is a slice, not a
    gather), else None; ``pos`` (batch, L): each token's original position; ``size`` (batch, L): how many
    original tokens each token stands for.
    """

    cls: torch.Tensor
    shared_cls: int | None
    pos: torch.Tensor
    size: torch.Tensor

    @classmethod
    def start(cls, batch: int, L: int, cls_position: int, device, dtype) -> TokenState:
        """The unreduced stream: every token itself, the class token at ``cls_position`` in every image."""
        return cls(torch.full((batch,), cls_position, dtype=torch.long, device=device), cls_position,
                   torch.arange(L, device=device).expand(batch, L), torch.ones(batch, L, dtype=dtype, device=device))

    def kept(self, kept: torch.Tensor, size: torch.Tensor | None = None) -> TokenState:
        """The state after keeping the ascending per-image indices ``kept`` (batch, K), the class token among
        them; ``size``: the sizes before keeping, when the step changed them (merges add sizes up). Where
        the class token lands depends on the image, and finding out whether it is the same everywhere would
        be a host sync: ``shared_cls`` is None."""
        cls = (kept < self.cls[:, None]).sum(dim=1)
        size = self.size if size is None else size
        return TokenState(cls, None, torch.gather(self.pos, 1, kept), torch.gather(size, 1, kept))

    def planned(self, plan) -> TokenState:
        """The state after a plan that is the same for every image (``stm_fast.reduction.merge.PlanIndex``)."""
        return replace(self, cls=torch.full_like(self.cls, plan.new_cls), shared_cls=plan.new_cls,
                       pos=plan.take(self.pos), size=plan.take(self.size))

    def class_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Each image's class-token row of x (batch, L, ...) -> (batch, ...)."""
        if self.shared_cls is not None:
            return x[:, self.shared_cls]
        return x[torch.arange(x.shape[0], device=x.device), self.cls]


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (batch, L, C) at per-image indices idx (batch, K): whole rows of one flattened (batch * L, C)
    matrix (``index_select`` copies rows; ``gather`` with an expanded index is much slower on CPU)."""
    batch, L, C = x.shape
    flat = (idx + torch.arange(batch, device=idx.device)[:, None] * L).reshape(-1)
    return x.reshape(batch * L, C).index_select(0, flat).view(batch, idx.shape[1], C)


def kept_from_mask(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending indices (batch, count) of the True entries of a (batch, L) mask holding ``count`` of them in
    every image. Each entry's rank among its kind (True first) places it: a permutation built by a cumsum
    and one scatter, where ``nonzero`` would have to read its result's size back from the device."""
    batch, L = mask.shape
    at = torch.arange(L, device=mask.device).expand(batch, L)
    rank = mask.cumsum(dim=1)  # True entries up to and including each entry
    slot = torch.where(mask, rank - 1, at - rank + count)
    return torch.empty_like(slot).scatter_(1, slot, at)[:, :count]
