"""What a Vim layer hands to the reduction step after it: both directions' per-token statistics.

The mixer computes delta, B, C and y for each direction anyway; a layer asked for its statistics
(``StatsRequest``) keeps references to them, in scan order, and the reduction steps read them lazily at
token positions (docs/conventions.md §2 for positions vs scan order). No extra projection, no copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["StatsRequest", "DirectionStats", "LayerStats"]


@dataclass(frozen=True)
class StatsRequest:
    """What a layer must export for the reduction step after it: its statistics and, when ``first_steps``
    is n > 0, the scan's own delta, Abar and B of each direction's first n steps (STM's ``ends`` plan);
    with ``output``, also the mixer's output before it is added to the residual (R-MeeTo's metric)."""

    first_steps: int = 0
    output: bool = False


class DirectionStats:
    """One direction's per-token statistics of a layer, read lazily at token positions.

    Holds what the branch computed anyway: in scan order (``flipped``, the default for a backward direction:
    the branch ran over the flipped sequence) or in position order (a backward scan by index arithmetic,
    the fused kernel's way): the pre-bias step ``delta_raw`` (batch, E, L), ``bias`` (E,), ``B``, ``C`` (batch, N, L),
    ``A`` (E, N), the SSM output ``y`` (batch, E, L) and its input ``u`` (batch, E, L). Accessors return token-position order; ``*_at``
    read only the requested positions, so a merge step touches a handful of tokens, not the sequence.
    """

    def __init__(self, delta_raw, bias, B, C, A, y, reverse=False, u=None, flipped=None):
        self.delta_raw, self.bias, self._B, self._C, self.A, self._y = delta_raw, bias, B, C, A, y
        self.reverse, self._u = reverse, u
        self.flipped = reverse if flipped is None else flipped  # stored in the scan order of a backward run
        self.L = delta_raw.shape[-1]

    def _idx(self, pos):
        pos = torch.as_tensor(pos, device=self.delta_raw.device)
        return self.L - 1 - pos if self.flipped else pos

    def _full(self, t):
        return t.flip(-1) if self.flipped else t

    @property
    def _backward_in_position_order(self):
        """A backward direction held in token-position order: its scan order is the reverse of the held one."""
        return self.reverse and not self.flipped

    def _first(self, t, n):
        """The first n scan steps of a held (..., L) array, in scan order."""
        return t[..., self.L - n:].flip(-1) if self._backward_in_position_order else t[..., :n]

    def _step(self, d_raw):
        """The scan's step softplus(delta + bias) from pre-bias rows (batch, len, E)."""
        return F.softplus(d_raw.to(self.bias.dtype) + self.bias)

    def delta_at(self, pos):
        """softplus(delta + bias) at token positions: (batch, E, len(pos))."""
        return self.delta_rows(pos).transpose(1, 2)

    def B_at(self, pos):
        return self._B.index_select(-1, self._idx(pos))

    def delta_rows(self, pos):
        """softplus(delta + bias) at token positions, channels last: (batch, len(pos), E)."""
        return self._step(self.delta_raw.transpose(1, 2).index_select(1, self._idx(pos)))

    def B_rows(self, pos):
        """B at token positions, states last: (batch, len(pos), N)."""
        return self._B.transpose(1, 2).index_select(1, self._idx(pos))

    def scan_rows(self, n):
        """softplus(delta + bias) and B of this direction's first n scan steps: (batch, n, E), (batch, n, N).
        The mixer's projections are (batch, L, channels) in memory, so these are slices, not gathers."""
        return self._step(self._first(self.delta_raw, n).transpose(1, 2)), self._first(self._B, n).transpose(1, 2)

    def scan_u_rows(self, n):
        """The scan's input u of this direction's first n scan steps: (batch, n, E)."""
        if self._u is None:
            raise ValueError("this layer's statistics hold no scan input u")
        return self._first(self._u, n).transpose(1, 2)

    def first_B(self, n):
        """B of the first n scan steps, step-major: (n, batch, N)."""
        return self._first(self._B, n).permute(2, 0, 1)

    def C_at(self, pos):
        return self._C.index_select(-1, self._idx(pos))

    @property
    def delta(self):
        return self._step(self._full(self.delta_raw).transpose(1, 2)).transpose(1, 2)

    @property
    def B(self):
        return self._full(self._B)

    @property
    def C(self):
        return self._full(self._C)

    @property
    def y(self):
        return self._full(self._y)

    @property
    def y_in_scan_order(self):
        """The SSM output in this direction's scan order (backward: position L-1 first)."""
        return self._y.flip(-1) if self._backward_in_position_order else self._y

    @property
    def u(self):
        """The scan's input (SiLU of the causal conv), (batch, E, L) in position order, when the layer kept it."""
        return None if self._u is None else self._full(self._u)


@dataclass
class LayerStats:
    """Both directions' statistics of one layer and, when the layer was asked for them and its scan
    backend exported them, the first steps of both directions stacked step-major: delta (n, 2, batch, E),
    Abar (n, 2, batch, N, E) and B (n, 2, batch, N) or None (forward first on the second axis). STM's step
    consumes ``first_steps``: it overwrites the Abar buffer with suffix products."""

    forward: DirectionStats
    backward: DirectionStats
    first_steps: tuple | None = None
    output: torch.Tensor | None = None  # the mixer output (batch, L, d), when requested
    scan_backend: str | None = None  # "fused" when the fused CPU kernel ran (and exported first_steps)

    def direction(self, forward: bool) -> DirectionStats:
        return self.forward if forward else self.backward
