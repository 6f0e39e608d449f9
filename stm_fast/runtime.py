"""Runtime helpers shared by the model, the kernels, eval, bench and train.

Device choice, autocast precision, device synchronisation, subnormal flushing, the compute dtype rule
(docs/conventions.md §10) and atomic file writes live here once, so every tool does them the same way.
This module imports nothing else of the package.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import textwrap
from typing import Any

import torch

__all__ = ["HelpFormatter", "AMP_DTYPES", "compute_dtype", "pick_device", "check_device", "positive_int", "non_negative_int", "autocast", "synchronize", "flush_denormals", "tf32_settings", "tf32_off",
           "atomic_write", "atomic_write_json"]

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # command-line name -> autocast dtype


def compute_dtype(*values: Any) -> torch.dtype:
    """float64 if any given tensor (or dtype) is float64, else float32: the precision the scan, the residual
    stream and the reduction steps compute in (docs/conventions.md §10). ``None`` entries are ignored."""
    for v in values:
        dtype = v if isinstance(v, torch.dtype) else getattr(v, "dtype", None)
        if dtype == torch.float64:
            return torch.float64
    return torch.float32


def pick_device(name: str | None = None) -> torch.device:
    """The device to run on: ``name`` if given, else CUDA when available, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def check_device(name: str | None = None) -> torch.device:
    """``pick_device(name)``, checked: ValueError (one line, with the fix) for a name torch does not know or
    a device this machine does not have."""
    try:
        device = pick_device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device name: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: this machine has no usable CUDA device; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def autocast(device: torch.device, precision: str = "fp32"):
    """An autocast context for ``precision`` ('fp32' | 'bf16' | 'fp16'); fp32 is a no-op context."""
    dtype = AMP_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def tf32_settings() -> dict:
    """Whether CUDA float32 matrix products (``matmul``) and cuDNN convolutions (``cudnn``) may run in TF32
    (a 10-bit mantissa). PyTorch's defaults: matmul off, cuDNN on, so an fp32 patch embedding runs in TF32."""
    return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32)}


@contextlib.contextmanager
def tf32_off():
    """Within the block, CUDA matrix products and cuDNN convolutions run in full float32; restored after."""
    before = tf32_settings()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before["matmul"], before["cudnn"]


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU, whose kernels run synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class flush_denormals:
    """Within the block, CPU float arithmetic flushes subnormals to zero; the previous mode is restored after.

    Trained Vim decays exp(delta*A) reach float32's subnormal range, where x86 arithmetic is several times
    slower; values below 1e-38 change no prediction (docs/conventions.md §10). torch has no getter for the
    mode, so the state this class set is tracked here (the process default is off)."""

    _on = False

    def __enter__(self):
        self.prev = flush_denormals._on
        flush_denormals._on = torch.set_flush_denormal(True) or self.prev
        return self

    def __exit__(self, *exc):
        torch.set_flush_denormal(self.prev)
        flush_denormals._on = self.prev
        return False


def atomic_write(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part:
    a per-process temporary name, fsync, then an atomic rename."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_options: Any) -> None:
    """``atomic_write`` of ``json.dumps(obj, **dump_options)``."""
    atomic_write(path, json.dumps(obj, **dump_options))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The command lines' help: the description as written, each option's default appended to its help
    unless the help already says it or there is none to state (None, False, an empty list), and lines
    never broken inside a hyphenated name."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        nothing = default is None or default is False or default == [] or default is argparse.SUPPRESS
        if "default" in text or nothing or not action.option_strings:
            return text
        return f"{text} (default: {' '.join(map(str, default)) if isinstance(default, list) else default})"

    def _split_lines(self, text, width):
        # names such as top-released or stm-oneside stay whole on one line
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (the error names the value)."""
    return _bounded_int(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _bounded_int(text, 0, "a non-negative integer")


def _bounded_int(text, low, what):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value
