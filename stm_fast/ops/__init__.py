"""Kernels of the fast path, apart from the model: selective-scan implementations and the causal conv.

Each kernel has a float64 reference twin in ``stm_ref`` (``stm_ref.ssm.selective_scan`` for the scans);
``stm_fast.ssm`` chooses among the scan backends.
"""
