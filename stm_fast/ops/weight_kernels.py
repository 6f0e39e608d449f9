"""STM's compiled weight kernels, one record each: a table apart from the scan backends' (a weight kernel is
not a scan, even where it lives in a scan backend's extension).

A record names the kernel's module in ``stm_fast.ops`` (imported on first use) and the function there, the
devices and compute dtypes it takes, the weight variants it computes (names of
``stm_fast.reduction.merge.WEIGHT_VARIANTS``), and what a user should know. Its module's ``check(device)``
says whether it really runs there (probed once per device, ``ops.probe``), so a machine without a compiler
runs STM on the torch forms. Every function computes the ``ends`` plan's weights (eq. 11, docs/conventions.md
§4) from the scan's exported first steps, step-major, for S stacked directions:

* ``function(d, abar, B, r, variant) -> (S, batch, r)`` in scan order, from d (n, S, batch, E), abar
  (n, S, batch, N, E), B (n, S, batch, N), all contiguous, n > r; abar is read, not overwritten.

Each is a faster form of its variants' definitions and is checked against them, with the other faster
forms, by ``tests/test_merge.py::test_every_fast_form_equals_its_variants_definition``. Adding a kernel:
its function and its record here; STM's step uses it for the variants it names wherever it works.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from .probe import probe

__all__ = ["WeightKernel", "WEIGHT_KERNELS", "kernels_for", "weight_kernel"]


@dataclass(frozen=True, kw_only=True)
class WeightKernel:
    name: str
    module: str  # a module of stm_fast.ops, imported on first use
    function: str  # its function, called as described in this module's docstring
    devices: tuple[str, ...]  # device types it runs on
    dtypes: tuple[torch.dtype, ...]  # compute dtypes it takes
    variants: tuple[str, ...]  # the weight variants it computes
    note: str = ""  # what a user should know

    def load(self) -> Callable:
        """The kernel's function (its module imported on first use; looked up on every call, so that a test
        may replace it)."""
        return getattr(importlib.import_module(self.module), self.function)

    def works(self, device: torch.device) -> bool:
        """Whether the kernel really runs on ``device`` (its module's ``check``, probed once per device)."""
        if device.type not in self.devices:
            return False
        return probe(f"weights:{self.name}", device, lambda d: importlib.import_module(self.module).check(d))[0]


WEIGHT_KERNELS = (
    WeightKernel(name="fused_ends_lsq", module="stm_fast.ops.scan_fused", function="ends_lsq_weights",
                 devices=("cpu",), dtypes=(torch.float32, torch.float64), variants=("lsq", "lsq_norm"),
                 note="the fused CPU extension (a C++ compiler, built on first use)"),
)


_BY_VARIANT = {v: tuple(k for k in WEIGHT_KERNELS if v in k.variants) for rec in WEIGHT_KERNELS for v in rec.variants}


def kernels_for(variant: str) -> tuple[WeightKernel, ...]:
    """The records of the kernels that compute ``variant``, in the table's order (nothing probed)."""
    return _BY_VARIANT.get(variant, ())


def weight_kernel(variant: str, tensors) -> Callable | None:
    """The function of the first kernel that computes ``variant`` and takes these tensors (all given,
    contiguous, on a device where it works, of a dtype it takes), or None: the caller then uses the torch forms."""
    kernels = kernels_for(variant)
    if not kernels or not all(t is not None and t.is_contiguous() for t in tensors):
        return None
    device, dtype = tensors[0].device, tensors[0].dtype
    for k in kernels:
        if dtype in k.dtypes and k.works(device):
            return k.load()
    return None
