"""invcache: feature inversion of detection transformers from a cache of DETR's intermediate tensors."""

from invcache.errors import InvcacheError, UsageError, WeightsError
from invcache.models import CONFIGS, DETR, DetrConfig, build_detr, get_config

__version__ = "0.1.0"

__all__ = [
    "CONFIGS", "DETR", "DetrConfig", "InvcacheError", "UsageError", "WeightsError", "build_detr", "get_config",
]
