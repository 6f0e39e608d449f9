"""Causal depthwise conv1d + SiLU (Mamba's short convolution); causal-conv1d's CUDA kernel when present.

Reference twin: ``stm_ref.vim.causal_conv1d`` (an explicit sum over the taps)."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from .common import channel_last
from .probe import probe, say_once

__all__ = ["causal_conv1d", "kernel_suits", "conv"]


def _check_causal_conv1d(device):
    """Raise unless causal-conv1d's compiled kernel imports and runs on ``device``."""
    if device.type != "cuda":
        raise RuntimeError(f"it needs a CUDA device, not {device}")
    importlib.import_module("causal_conv1d_cuda")
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_fn

    causal_conv1d_fn(torch.zeros(1, 8, 4, device=device), torch.zeros(8, 4, device=device), activation="silu")


def kernel_suits(x, K) -> bool:
    """Whether causal-conv1d's CUDA kernel works here (probed once) and accepts this call: float32/16/bf16
    input, width 2..4, and a layout it reads (last axis contiguous, or channel-last with channels and
    strides multiples of 8)."""
    if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not 2 <= K <= 4:
        return False
    if x.stride(2) != 1 and not (x.stride(1) == 1 and x.shape[1] % 8 == 0 and x.stride(0) % 8 == 0
                                 and x.stride(2) % 8 == 0):
        return False
    ok, reason = probe("causal_conv1d", x.device, _check_causal_conv1d)
    if not ok and importlib.util.find_spec("causal_conv1d") is not None:
        say_once(f"causal-conv1d is installed but not used on {x.device}: {reason}")
    return ok


def causal_conv1d(x, weight, bias=None, activation=True, reverse=False):
    """y_t = silu(sum_k weight[:, k] x_{t-K+1+k} + bias) over (batch, channels, L), zero history before t=0.

    ``weight``: (channels, 1, K) as nn.Conv1d stores it (or (channels, K)). Uses causal-conv1d's CUDA
    kernel when it works here and suits the call (``kernel_suits``; the weight keeps its dtype, as Mamba
    passes it); else torch's conv1d with left padding, or K shifted multiply-adds when x is channel-last in
    memory (``x.stride(1) == 1``, Vim's mixer). ``reverse``: the conv of the time-reversed sequence, indexed
    by t (y_t reads x_t .. x_{t+K-1}), what a backward scan needs: here on a flipped copy, flipped back.
    """
    if reverse:
        return causal_conv1d(x.flip(-1), weight, bias, activation).flip(-1)
    w = weight if weight.dim() == 2 else weight[:, 0, :]
    K = w.shape[-1]
    if kernel_suits(x, K):
        from causal_conv1d.causal_conv1d_interface import causal_conv1d_fn

        return causal_conv1d_fn(x, w, None if bias is None else bias.to(w.dtype), activation="silu" if activation else None)
    w = w.to(x.dtype)
    if x.shape[1] > 1 and channel_last(x):
        return _taps_channel_last(x, w, bias, activation)
    y = F.conv1d(F.pad(x, (K - 1, 0)), w[:, None, :], None if bias is None else bias.to(x.dtype), groups=x.shape[1])
    return F.silu(y) if activation else y


def _taps_channel_last(x, w, bias, activation):
    """The same conv on channel-last memory, as K shifted multiply-adds over contiguous (batch, L, channels)
    rows; the result keeps that layout. On CPU much faster than conv1d, which would first transpose x (docs/performance.md)."""
    xr = x.transpose(1, 2)
    K, L = w.shape[-1], xr.shape[1]
    wt = w.t().contiguous()  # (K, channels): tap k multiplies x_{t-K+1+k}
    y = torch.mul(xr, wt[K - 1]) if bias is None else torch.addcmul(bias.to(x.dtype), xr, wt[K - 1])
    grad = torch.is_grad_enabled()
    for shift in range(1, min(K, L)):
        if grad:  # out of place, so autograd keeps every term
            y = torch.cat([y[:, :shift], y[:, shift:].addcmul(xr[:, :L - shift], wt[K - 1 - shift])], dim=1)
        else:
            y[:, shift:].addcmul_(xr[:, :L - shift], wt[K - 1 - shift])
    if activation:
        y = F.silu(y, inplace=not grad)
    return y.transpose(1, 2)


def conv(x, weight, bias, reverse=False):
    """The ``conv`` of a backend without its own (``stm_fast.ops.backends``): ``causal_conv1d`` + SiLU, which
    takes causal-conv1d's CUDA kernel where it works and suits the call."""
    return causal_conv1d(x, weight, bias, reverse=reverse)
