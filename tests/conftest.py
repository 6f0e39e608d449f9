"""Test set-up for tests/: run Triton kernels through its interpreter where there is no GPU."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before stm_fast.triton_scan is first imported (triton reads it when decorating kernels).
    os.environ.setdefault("TRITON_INTERPRET", "1")
