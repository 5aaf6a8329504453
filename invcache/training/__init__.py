"""Training inverse modules from a cache (never from DETR)."""

from invcache.settings import TrainSettings
from invcache.training.loop import TrainProgress, TrainResult, evaluate, prepare, train, train_step

__all__ = ["TrainProgress", "TrainResult", "TrainSettings", "evaluate", "prepare", "train", "train_step"]
