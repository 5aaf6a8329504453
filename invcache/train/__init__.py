"""Training inverse modules from a cache (never from DETR)."""

from invcache.settings import TrainSettings
from invcache.train.loop import TrainResult, evaluate, train

__all__ = ["TrainResult", "TrainSettings", "evaluate", "train"]
