"""Training inverse modules from a cache (never from DETR)."""

from invcache.train.loop import TrainResult, TrainSettings, evaluate, train

__all__ = ["TrainResult", "TrainSettings", "evaluate", "train"]
