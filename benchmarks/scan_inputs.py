"""Scan inputs the scan benchmarks share (bench_scan.py, scan_ratios.py, numba_scan.py)."""

import torch

__all__ = ["scan_inputs", "channel_last"]


def scan_inputs(batch, D, L, N, device="cpu", dtype=torch.float32, seed=0):
    """Random arguments of ``stm_fast.ssm.selective_scan`` with Vim-like scales (delta around softplus(-3))."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return dict(u=r(batch, D, L), delta=r(batch, D, L) - 3, A=-torch.rand(D, N, generator=g).mul(15).add(1).to(device),
                B=r(batch, N, L), C=r(batch, N, L), D=r(D), z=r(batch, D, L), delta_bias=r(D), delta_softplus=True)


def channel_last(kw):
    """The same values held (batch, L, channels) in memory: how Vim's mixer hands them to the scan."""
    return {k: v.transpose(1, 2).contiguous().transpose(1, 2) if k in ("u", "delta", "z", "B", "C") else v
            for k, v in kw.items()}
