"""DETR with named taps: configs, construction and weights."""

from __future__ import annotations

import torch

from invcache.models.config import CONFIGS, DetrConfig, get_config
from invcache.models.detr import DETR
from invcache.models.postprocess import post_process
from invcache.models.weights import load_weights, read_checkpoint, weights_sha256


def build_detr(name: str = "detr-r50", weights: str = "official", device: str | torch.device = "cpu") -> DETR:
    """A frozen DETR in eval mode, e.g. ``build_detr("detr-tiny", "random:0")``.

    ``weights``: ``official``, ``random[:SEED]``, the name of weights shipped with invcache (``demo``:
    a detr-tiny trained on the synthetic shapes, :data:`invcache.models.weights.EMBEDDED_WEIGHTS`), or the
    path of an official or HF checkpoint (what ``invcache train detr`` writes is one).
    ``model.fingerprint`` identifies config and weights; caches record it.
    """
    config = get_config(name)
    with torch.random.fork_rng(devices=[]):  # the layers' default initialization must not draw from the caller's RNG
        model = DETR(config)
    source = load_weights(model, weights)
    model.requires_grad_(False).eval()
    model.fingerprint = {
        "model": config.name,
        "config": config.to_dict(),
        "weights": source,
        "weights_sha256": weights_sha256(model),
    }
    model = model.to(device)
    if torch.device(device).type == "cuda":
        # cuDNN's fastest convolutions on tensor cores take NHWC; normalize() already yields NHWC-strided input.
        # (cuDNN autotuning is process-wide state: extraction turns it on only when asked.)
        model = model.to(memory_format=torch.channels_last)
    return model


__all__ = ["CONFIGS", "DETR", "DetrConfig", "build_detr", "get_config", "post_process", "read_checkpoint"]
