"""Training: inverse modules from a cache, never running DETR (:mod:`invcache.training.loop`, exported here),
and DETR itself (:mod:`invcache.training.detr`, ``invcache train detr``; imported on its own, as it loads the
evaluation code)."""

from invcache.settings import TrainSettings
from invcache.training.loop import TrainProgress, TrainResult, evaluate, prepare, train, train_step

__all__ = ["TrainProgress", "TrainResult", "TrainSettings", "evaluate", "prepare", "train", "train_step"]
