"""invcache: feature inversion of detection transformers from a cache of DETR's intermediate tensors.

The public API (SPEC §9). Names load on first use, so ``import invcache`` (and
``invcache --help``) does not pay for torch until something needs it::

    import invcache
    model = invcache.build_detr("detr-tiny", "random:0")
    taps = invcache.forward_taps(model, images, "enc.*,head.*")      # uint8 (B, H, W, 3) images in
    cache = invcache.open_cache("invcache-runs/cache/val2017")
    modules = invcache.load_modules("invcache-runs/modules")
    pixels = invcache.invert(modules, {"enc.6": cache["enc.6"].torch[:8]})

``invcache.extract``, ``invcache.train`` and ``invcache.train_detr`` run what ``invcache extract``,
``invcache train NAME`` and ``invcache train detr`` run, from settings dataclasses (``ExtractSettings``,
``TrainSettings``, ``DetrTrainSettings``); each analysis is
``invcache.analysis.<name>.run(AnalyzeSettings(...))``, what ``invcache analyze NAME`` runs.
"""

from __future__ import annotations

from invcache.lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "InvcacheError": "invcache.errors",
    "UsageError": "invcache.errors",
    "WeightsError": "invcache.errors",
    "Workspace": "invcache.workspace",
    "ExtractSettings": "invcache.settings",
    "TrainSettings": "invcache.settings",
    "DetrTrainSettings": "invcache.settings",
    "CONFIGS": "invcache.models",
    "DETR": "invcache.models",
    "DetrConfig": "invcache.models",
    "build_detr": "invcache.models",
    "get_config": "invcache.models",
    "forward_taps": "invcache.forward",
    "open_cache": "invcache.cache",
    "Cache": "invcache.cache",
    "extract": "invcache.extraction",
    "ExtractResult": "invcache.extraction",
    "train": "invcache.training",
    "TrainResult": "invcache.training",
    "TrainProgress": "invcache.training",
    "train_detr": "invcache.training.detr",
    "AnalyzeSettings": "invcache.settings",
    "STAGES": "invcache.chain",
    "load_modules": "invcache.chain",
    "invert": "invcache.chain",
    "chain_for": "invcache.chain",
}

__all__ = [
    "CONFIGS", "DETR", "STAGES", "Cache", "DetrConfig", "DetrTrainSettings", "ExtractResult", "ExtractSettings",
    "InvcacheError", "TrainProgress", "TrainResult", "TrainSettings", "UsageError", "WeightsError", "Workspace",
    "build_detr", "chain_for", "extract", "forward_taps", "get_config", "invert", "load_modules", "open_cache",
    "train", "train_detr", "AnalyzeSettings",
]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
