"""One frozen DETR forward over a batch of stored uint8 images: normalize on the device, autocast, taps."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from invcache import taps as T
from invcache.data.preprocess import normalize
from invcache.errors import UsageError
from invcache.models.detr import DETR

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def resolve_amp(amp: str | None, device: torch.device) -> torch.dtype | None:
    """``None`` picks bf16 on CUDA and full precision elsewhere."""
    if amp is None:
        return torch.bfloat16 if device.type == "cuda" else None
    if amp not in AMP_DTYPES:
        raise UsageError(f"bad --amp {amp!r}; choose one of: {', '.join(AMP_DTYPES)}")
    return AMP_DTYPES[amp]


def forward_taps(
    model: DETR, images: torch.Tensor, taps: str | Sequence[str], amp: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Taps of a uint8 (B, H, W, 3) batch; ``input`` is the batch itself, the rest come from the model.

    ``taps`` is a list of names or a selection such as ``"enc.*,head.*"`` (SPEC §1).
    """
    if isinstance(taps, str):
        taps = model.config.select_taps(taps)
    device = next(model.parameters()).device
    images = images.to(device, non_blocking=True)
    model_taps = [t for t in taps if t not in T.DATA_TAPS]
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        out = model(normalize(images), model_taps) if model_taps else {}
    if T.INPUT in taps:
        out[T.INPUT] = images
    return {t: out[t] for t in taps}
