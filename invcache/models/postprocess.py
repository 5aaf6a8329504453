"""DETR's post-processing: head outputs → scored, labelled boxes in the original image's pixels.

Exactly facebookresearch/detr's ``PostProcess`` (models/detr.py), which its COCO evaluation
uses: softmax over the logits, the last (no-object) class dropped, score = the highest
real-class probability and label = its index (DETR's class index *is* the COCO category id),
boxes (cx, cy, w, h) → (x0, y0, x1, y1) scaled by the original (H, W). DETR's boxes are
normalized to the image it saw, so scaling by the original size maps them back whatever
resize (aspect kept or not) came in between. Every query is kept, as DETR's evaluation does;
thresholding is the caller's business.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torchvision.ops import box_convert


class Detections(NamedTuple):
    """Per image and query: ``scores`` (B, Q), ``labels`` (B, Q) int64, ``boxes`` (B, Q, 4) xyxy in pixels."""

    scores: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor


@torch.no_grad()
def post_process(logits: torch.Tensor, boxes: torch.Tensor, orig_size: torch.Tensor) -> Detections:
    """DETR's ``PostProcess`` on a batch: ``logits`` (B, Q, C+1), ``boxes`` (B, Q, 4) cxcywh in [0, 1],
    ``orig_size`` (B, 2) original (H, W). Computed in float32 (cached head outputs are float16).
    """
    probabilities = logits.float().softmax(-1)
    scores, labels = probabilities[..., :-1].max(-1)
    corners = box_convert(boxes.float(), in_fmt="cxcywh", out_fmt="xyxy")
    height, width = orig_size.to(corners).unbind(-1)
    scale = torch.stack([width, height, width, height], dim=-1)
    return Detections(scores, labels, corners * scale[:, None, :])
