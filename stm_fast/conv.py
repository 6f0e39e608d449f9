"""Causal depthwise conv1d + SiLU (Mamba's short convolution); causal-conv1d's CUDA kernel when present."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

__all__ = ["causal_conv1d"]


def _kernel_available(x):
    return x.is_cuda and importlib.util.find_spec("causal_conv1d") is not None


def causal_conv1d(x, weight, bias=None, activation=True):
    """y_t = silu(sum_k weight[:, k] x_{t-K+1+k} + bias) over (batch, channels, L), zero history before t=0.

    ``weight``: (channels, 1, K) as nn.Conv1d stores it (or (channels, K)). Uses causal-conv1d's CUDA
    kernel when installed and x is on CUDA, else torch's conv1d with left padding.
    """
    w = weight if weight.dim() == 2 else weight[:, 0, :]
    if _kernel_available(x) and x.dtype in (torch.float16, torch.bfloat16, torch.float32):
        from causal_conv1d import causal_conv1d_fn

        return causal_conv1d_fn(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype),
                                activation="silu" if activation else None)
    K = w.shape[-1]
    y = F.conv1d(F.pad(x, (K - 1, 0)), w[:, None, :].to(x.dtype), None if bias is None else bias.to(x.dtype),
                 groups=x.shape[1])
    return F.silu(y) if activation else y
