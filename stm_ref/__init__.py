"""Float64 NumPy reference for Sequential Token Merging on Vision Mamba (no torch here).

* ``stm_ref.ssm``: the discrete selective SSM (eq. 2-5) and mamba-ssm's batched selective scan.
* ``stm_ref.merge``: BNNM plans, HSP weights and the merge losses (eq. 8-13, 18-21).
* ``stm_ref.vim``: the Vision Mamba forward from a state dict, optionally reduced.
* ``stm_ref.reduction``: STM and its peers, one image at a time (twins of ``stm_fast.reduction``).
"""

from . import merge, ssm

__all__ = ["ssm", "merge"]
