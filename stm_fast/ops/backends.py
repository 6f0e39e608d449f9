"""The scan backends, one record each: everything the rest of the package knows about a kernel is here.

A record names the kernel's module in ``stm_fast.ops`` (imported on first use) and states its facts: the
devices it runs on and those where the automatic choice tries it, the compute dtypes it takes, whether it
is differentiable, takes a ``decay_scale``, exports its first scan steps, scans backward by index
arithmetic (``reverse="index"``) or on flipped copies (``"flip"``), what must be installed for it to be
expected to work, and the environment variables its probe depends on. Records are built with keywords
only. (STM's compiled weight kernels, which are not scans, have their own table:
``stm_fast.ops.weight_kernels``.) Every module implements the same three functions:

* ``check(device)``: raise (with the reason) unless the kernel really runs there;
* ``scan(call: ScanCall) -> ScanOutput``: the call, ``reverse`` included;
* ``conv(x, weight, bias, reverse)``: Mamba's causal conv + SiLU as that backend's mixer runs it.

The order of ``BACKENDS`` is the automatic preference. Adding a backend: its module and its record here;
removing one: its record (the model imports no backend module).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

__all__ = ["Backend", "BACKENDS", "backend", "names"]

_F32, _F64, _F16, _BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16


@dataclass(frozen=True, kw_only=True)
class Backend:
    name: str
    module: str
    devices: tuple[str, ...]  # device types it can run on ("*": any)
    automatic_on: tuple[str, ...]  # device types where the automatic choice tries it
    dtypes: tuple[torch.dtype, ...]  # compute dtypes it takes
    differentiable: bool
    decay_scale: bool
    first_steps: bool  # returns its first scan steps (FirstSteps) when asked
    reverse: str  # "index" or "flip"
    requires: tuple[str, ...] = ()  # importable modules that make it expected to work (empty: always expected)
    probe_env: tuple[str, ...] = ()  # environment variables the probe's answer depends on
    note: str = ""  # what a user should know when asking for it

    def load(self):
        """The kernel's module (imported on first use)."""
        return importlib.import_module(self.module)

    def runs_on(self, device: torch.device) -> bool:
        return "*" in self.devices or device.type in self.devices


BACKENDS = (
    Backend(name="mamba_ssm", module="stm_fast.ops.scan_mamba", devices=("cuda",), automatic_on=("cuda",),
            dtypes=(_F32, _F16, _BF16), differentiable=False, decay_scale=False, first_steps=False, reverse="flip",
            requires=("selective_scan_cuda", "mamba_ssm"), note="CUDA and `pip install .[cuda]`"),
    Backend(name="triton", module="stm_fast.ops.scan_triton", devices=("cuda", "cpu"), automatic_on=("cuda",),
            dtypes=(_F32, _F64), differentiable=False, decay_scale=True, first_steps=False, reverse="index",
            requires=("triton",), probe_env=("TRITON_INTERPRET",), note="CUDA, or CPU under TRITON_INTERPRET=1"),
    Backend(name="fused", module="stm_fast.ops.scan_fused", devices=("cpu",), automatic_on=("cpu",),
            dtypes=(_F32, _F64), differentiable=True, decay_scale=True, first_steps=True, reverse="index",
            note="a C++ compiler (built on first use)"),
    Backend(name="torch", module="stm_fast.ops.scan_torch", devices=("*",), automatic_on=("*",),
            dtypes=(_F32, _F64), differentiable=True, decay_scale=True, first_steps=True, reverse="flip"),
    Backend(name="loop", module="stm_fast.ops.scan_loop", devices=("*",), automatic_on=(),
            dtypes=(_F32, _F64), differentiable=True, decay_scale=True, first_steps=False, reverse="flip"),
)

_BY_NAME = {b.name: b for b in BACKENDS}


def names() -> tuple[str, ...]:
    return tuple(_BY_NAME)


def backend(name: str) -> Backend:
    """The record of ``name``; ValueError naming the choices for an unknown one."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown scan backend {name!r}; choose one of {names()}")
    return _BY_NAME[name]
