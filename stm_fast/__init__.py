"""Fast PyTorch Vision Mamba with STM and its peers; every function has a float64 twin in ``stm_ref``.

docs/architecture.md describes the parts and how they fit; docs/conventions.md the conventions they rely on.
"""

from .checkpoint import CheckpointError
from .flops import flops
from .models import create_model, list_models
from .reduction import Reduction, list_methods, make_reduction, reduce, reduced
from .ssm import available_backends, selective_scan

__all__ = ["create_model", "list_models", "reduce", "reduced", "make_reduction", "Reduction", "list_methods", "flops",
           "selective_scan", "available_backends", "CheckpointError"]
