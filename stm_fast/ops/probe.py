"""Whether an optional compiled kernel really works here, asked once and remembered.

A package being importable is not enough: mamba-ssm installs without its CUDA extension, causal-conv1d's
extension can be built for another torch, and a CUDA build may lack this GPU's architecture. A probe
imports the compiled module itself and, on a CUDA device, runs one tiny call there; the answer and the
reason are cached per (kernel, device). When the automatic choice passes a kernel over, one line on
stderr says why, once per kernel and reason.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

__all__ = ["probe", "clear_probes", "say_once"]

_CACHE: dict[tuple[str, str], tuple[bool, str]] = {}
_SAID: set[str] = set()


def probe(name: str, device: torch.device, check: Callable[[torch.device], None]) -> tuple[bool, str]:
    """(works, reason) of kernel ``name`` on ``device``; ``check(device)`` raises when it does not work."""
    key = (name, str(device))
    if key not in _CACHE:
        try:
            check(device)
            _CACHE[key] = (True, "")
        except Exception as e:  # noqa: BLE001 - ImportError, OSError (libraries), AttributeError, RuntimeError ...
            first = (str(e).strip().splitlines() or [""])[0]
            _CACHE[key] = (False, f"{type(e).__name__}: {first[:160]}")
    return _CACHE[key]


def clear_probes() -> None:
    """Forget every answer (tests, or after installing a package in a running session)."""
    _CACHE.clear()
    _SAID.clear()


def say_once(line: str) -> None:
    """Print ``line`` to stderr the first time it is said in this process."""
    if line not in _SAID:
        _SAID.add(line)
        print(f"stm_fast: {line}", file=sys.stderr)
