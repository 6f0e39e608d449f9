"""Fast PyTorch Vision Mamba with STM and its peers; every function has a float64 twin in ``stm_ref``."""

from .checkpoint import CheckpointError
from .flops import flops
from .models import create_model, list_models
from .reduce import reduce
from .scan import available_backends, selective_scan

__all__ = ["create_model", "list_models", "reduce", "flops", "selective_scan", "available_backends", "CheckpointError"]
