"""Extraction: stream a split through frozen DETR into a sharded cache (``invcache extract``).

``run`` holds the settings, the create-or-resume decision and the distribution of shards;
``loop`` the batches-in, whole-shards-out loop that overlaps the device, the host and the writers.
"""

from invcache.extraction.run import ExtractResult, ExtractSettings, estimate_bytes, extract

__all__ = ["ExtractResult", "ExtractSettings", "estimate_bytes", "extract"]
