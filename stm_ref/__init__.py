"""Float64 NumPy reference for Sequential Token Merging on Vision Mamba (no torch here).

* ``stm_ref.ssm``: the discrete selective SSM (eq. 2-5) and mamba-ssm's batched selective scan.
* ``stm_ref.merge``: BNNM plans, HSP weights and the merge losses (eq. 8-13, 18-21).
"""

from . import merge, ssm

__all__ = ["ssm", "merge"]
