"""What a Vim layer hands to the reduction step after it: both directions' per-token statistics.

The mixer computes delta, B, C and y for each direction anyway; a layer asked for its statistics
(``StatsRequest``) keeps references to them, in scan order, and the reduction steps read them lazily at
token positions (docs/conventions.md §2 for positions vs scan order). No extra projection, no copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    """One direction's per-token statistics of a layer, held in token position order whatever the direction.

    What the branch computed anyway: the pre-bias step ``delta_raw`` (batch, E, L), ``bias`` (E,), ``B``,
    ``C`` (batch, N, L), ``A`` (E, N), the SSM output ``y`` (batch, E, L) and its input ``u`` (batch, E, L).
    ``reverse``: the direction scans t = L-1 .. 0, so its scan order is the reverse of position order (its
    first scan steps are the last positions). Accessors return position order; ``*_at`` and ``*_rows``
    read only the requested positions, so a merge step touches a handful of tokens, not the sequence.
    """

    def __init__(self, delta_raw, bias, B, C, A, y, reverse=False, u=None, dtype=None):
        self.delta_raw, self.bias, self.A = delta_raw, bias, A
        self.B, self.C = (t if dtype is None or t is None else t.to(dtype) for t in (B, C))  # (batch, N, L): small
        self._y, self._u, self.dtype = y, u, dtype
        self.reverse = reverse
        self.L = delta_raw.shape[-1]

    def in_dtype(self, dtype) -> DirectionStats:
        """The same statistics read in ``dtype``: B and C converted now, y and u when read, the step
        softplus(delta + bias) in the bias's dtype as always (under autocast the projections are bf16/fp16;
        the reductions compute in float32, docs/conventions.md §10)."""
        return DirectionStats(self.delta_raw, self.bias.to(dtype), self.B, self.C, self.A.to(dtype), self._y,
                              self.reverse, self._u, dtype)

    def _read(self, t):
        return t if t is None or self.dtype is None else t.to(self.dtype)

    @property
    def y(self):
        """The SSM output (batch, E, L), in the statistics' dtype."""
        return self._read(self._y)

    @property
    def u(self):
        """The scan input (batch, E, L), or None, in the statistics' dtype."""
        return self._read(self._u)

    def _first(self, t, n):
        """The first n scan steps of a (..., L) array, in scan order."""
        return t[..., self.L - n:].flip(-1) if self.reverse else t[..., :n]

    def _step(self, d_raw):
        """The scan's step softplus(delta + bias) from pre-bias rows (batch, len, E)."""
        return F.softplus(d_raw.to(self.bias.dtype) + self.bias)

    def _pos(self, pos):
        return torch.as_tensor(pos, device=self.delta_raw.device)

    def delta_at(self, pos):
        """softplus(delta + bias) at token positions: (batch, E, len(pos))."""
        return self.delta_rows(pos).transpose(1, 2)

    def B_at(self, pos):
        return self.B.index_select(-1, self._pos(pos))

    def C_at(self, pos):
        return self.C.index_select(-1, self._pos(pos))

    def delta_rows(self, pos):
        """softplus(delta + bias) at token positions, channels last: (batch, len(pos), E)."""
        return self._step(self.delta_raw.transpose(1, 2).index_select(1, self._pos(pos)))

    def B_rows(self, pos):
        """B at token positions, states last: (batch, len(pos), N)."""
        return self.B.transpose(1, 2).index_select(1, self._pos(pos))

    def scan_rows(self, n):
        """softplus(delta + bias) and B of this direction's first n scan steps: (batch, n, E), (batch, n, N).
        The mixer's projections are (batch, L, channels) in memory, so these are slices, not gathers."""
        return self._step(self._first(self.delta_raw, n).transpose(1, 2)), self._first(self.B, n).transpose(1, 2)

    def scan_u_rows(self, n):
        """The scan's input u of this direction's first n scan steps: (batch, n, E)."""
        if self.u is None:
            raise ValueError("this layer's statistics hold no scan input u")
        return self._first(self.u, n).transpose(1, 2)

    def first_B(self, n):
        """B of the first n scan steps, step-major: (n, batch, N)."""
        return self._first(self.B, n).permute(2, 0, 1)

    @property
    def delta(self):
        return self._step(self.delta_raw.transpose(1, 2)).transpose(1, 2)

    @property
    def y_in_scan_order(self):
        """The SSM output in this direction's scan order (backward: position L-1 first)."""
        return self.y.flip(-1) if self.reverse else self.y


@dataclass
class LayerStats:
    """Both directions' statistics of one layer and, when the layer was asked for them and its scan backend
    returned them, both directions' first scan steps (``first_pair``: forward, backward ``FirstSteps``, the
    scan's own buffers, in scan order).

    The first steps have one owner at a time: these statistics until someone takes them
    (``take_first_steps``), then the taker, who may overwrite them (STM's weights write suffix products of
    Abar into the Abar buffers, ``stm_fast.reduction.merge.ends_weights``). They are handed over once; a view
    of these statistics in another dtype (``in_dtype``) shares them and their hand-over. ``replace(stats,
    first_pair=...)`` makes new statistics that own the buffers given."""

    forward: DirectionStats
    backward: DirectionStats
    first_pair: tuple | None = None
    output: torch.Tensor | None = None  # the mixer output (batch, L, d), when requested
    # whether first_pair was handed over: one mutable flag shared by the views of these statistics
    _handed: list = field(default_factory=lambda: [False], init=False, repr=False, compare=False)

    def direction(self, forward: bool) -> DirectionStats:
        return self.forward if forward else self.backward

    def in_dtype(self, dtype) -> LayerStats:
        """These statistics read in ``dtype`` (itself if they already are: bias, B and C in it); a new view
        shares the first steps and their hand-over (``take_first_steps``)."""
        f = self.forward
        if f.bias.dtype == dtype and f.B.dtype == dtype and f.C.dtype == dtype and (f._y is None or f._y.dtype == dtype):
            return self
        out = None if self.output is None else self.output.to(dtype)
        view = LayerStats(self.forward.in_dtype(dtype), self.backward.in_dtype(dtype), self.first_pair, out)
        view._handed = self._handed
        return view

    @property
    def first_steps(self) -> tuple | None:
        """The first steps these statistics still own (forward, backward ``FirstSteps``), to look at; None when
        the layer exported none or they were taken. Whoever overwrites them takes them first."""
        return None if self._handed[0] else self.first_pair

    def take_first_steps(self) -> tuple | None:
        """Hand the scan's first steps (forward, backward ``FirstSteps``) over to the caller, who owns them from
        then on and may overwrite their buffers; None when the layer exported none. Once only: a second take
        (through these statistics or a view of them) raises RuntimeError, since the buffers may hold something
        else by then (take them from ``replace(stats, first_pair=<copies>)`` to compute twice)."""
        if self.first_pair is None:
            return None
        if self._handed[0]:
            raise RuntimeError("these statistics' first scan steps were taken already (their owner may have "
                               "overwritten them)")
        self._handed[0] = True
        return self.first_pair
