"""DETR's detection loss (the official ``SetCriterion``) and COCO ground truth in the form it reads.

A port of facebookresearch/detr ``models/detr.py`` (``SetCriterion``) and of the box handling
of ``datasets/coco.py`` (``ConvertCocoPolysToMask``) and ``datasets/transforms.py``
(``Normalize``), so that a model fine-tuned here (SPEC §5 ``tradeoff``) optimizes the very
objective DETR was trained with. ``tests/test_detr_loss.py`` checks every term against HF
transformers' implementation.

Usage::

    criterion = SetCriterion(num_classes=model.config.num_classes)
    targets = [coco_target(image, annotations, criterion.num_classes) for image, annotations in batch]
    losses = criterion(model.detection_outputs(images), targets)
    criterion.total(losses).backward()
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import distributed as dist
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

from invcache.errors import UsageError
from invcache.models.detr import DetrOutputs, DetrPredictions
from invcache.models.matcher import DetrTarget, HungarianMatcher, Match

_LAYER_SUFFIX = re.compile(r"_\d+$")


class SetCriterion(nn.Module):
    """DETR's loss: Hungarian matching, then classification and box losses on the matched pairs.

    For the last decoder layer and, when ``outputs`` has ``aux_outputs``, for each earlier layer
    ``i`` (0-based, suffix ``_i``), each layer matched on its own:

    - ``loss_ce``: cross-entropy over ``num_classes + 1`` classes, every unmatched query's
      target being no-object (index ``num_classes``), whose weight is ``eos_coef`` because
      most queries are unmatched; averaged over queries with those weights;
    - ``loss_bbox``: L1 distance of matched (cx, cy, w, h) boxes, summed;
    - ``loss_giou``: 1 − generalized IoU of matched boxes, summed;
    - ``cardinality_error`` (no gradient, for logging): mean |predicted objects − targets| per image;
    - ``class_error`` (last layer only, no gradient): 100 − top-1 accuracy (%) of the matched queries.

    Box losses are divided by the number of target boxes in the batch, averaged over the
    processes of torch.distributed's group when one is initialised and clamped to ≥ 1, so
    every box weighs the same whatever image or process it is on, and a batch without
    objects trains only the no-object class. :meth:`total` weighs the terms.
    """

    def __init__(self, num_classes: int = 91, matcher: HungarianMatcher | None = None, eos_coef: float = 0.1,
                 weight_ce: float = 1.0, weight_bbox: float = 5.0, weight_giou: float = 2.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.eos_coef = eos_coef
        self.weight_dict = {"loss_ce": weight_ce, "loss_bbox": weight_bbox, "loss_giou": weight_giou}
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def forward(self, outputs: DetrOutputs, targets: Sequence[DetrTarget]) -> dict[str, torch.Tensor]:
        """Every term, keyed by the official names (``loss_ce``, …, ``loss_ce_0``, …)."""
        classes = outputs["pred_logits"].shape[-1]
        if classes != self.num_classes + 1:
            raise ValueError(f"the logits have {classes} classes; this loss expects num_classes + 1 = "
                             f"{self.num_classes + 1}")
        num_boxes = self.normalizer(targets, outputs["pred_logits"].device)
        losses = self._layer_losses(outputs, targets, num_boxes, log=True)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            layer = self._layer_losses(aux, targets, num_boxes, log=False)
            losses.update({f"{name}_{i}": value for name, value in layer.items()})
        return losses

    def total(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum the official training loop minimizes: each ``loss_*`` (and ``loss_*_i``)
        times its weight; the ``*_error`` figures are only logged."""
        return sum(value * self.weight_dict[_LAYER_SUFFIX.sub("", name)] for name, value in losses.items()
                   if _LAYER_SUFFIX.sub("", name) in self.weight_dict)

    @staticmethod
    def normalizer(targets: Sequence[DetrTarget], device: torch.device) -> float:
        """Target boxes per process (all-reduced under torch.distributed), at least 1.

        Every rank must call it (the loss does) when a process group is initialised: it is a collective.
        """
        num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            world = dist.get_world_size()
        return torch.clamp(num_boxes / world, min=1).item()

    def _layer_losses(self, outputs: DetrPredictions, targets: Sequence[DetrTarget], num_boxes: float,
                      log: bool) -> dict[str, torch.Tensor]:
        matches = self.matcher(outputs, targets)
        queries = _matched_queries(matches)
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]

        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, matches)])
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[queries] = matched_labels
        losses = {"loss_ce": F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)}
        if log:
            losses["class_error"] = _class_error(logits[queries], matched_labels)

        matched_boxes = boxes[queries]
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, matches)])
        losses["loss_bbox"] = F.l1_loss(matched_boxes, target_boxes, reduction="none").sum() / num_boxes
        giou = generalized_box_iou(box_convert(matched_boxes, "cxcywh", "xyxy"),
                                   box_convert(target_boxes, "cxcywh", "xyxy"))
        losses["loss_giou"] = (1 - torch.diag(giou)).sum() / num_boxes
        losses["cardinality_error"] = _cardinality_error(logits, targets)
        return losses


def _matched_queries(matches: Sequence[Match]) -> tuple[torch.Tensor, torch.Tensor]:
    """(image index, query index) of every matched query, to index (B, Q, …) tensors."""
    images = torch.cat([torch.full_like(queries, i) for i, (queries, _) in enumerate(matches)])
    queries = torch.cat([queries for queries, _ in matches])
    return images, queries


@torch.no_grad()
def _class_error(matched_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # The official accuracy() is 0 % when nothing is matched, so the error is then 100.
    if labels.numel() == 0:
        return torch.full((), 100.0, device=matched_logits.device)
    accuracy = (matched_logits.argmax(-1) == labels).float().mean() * 100
    return 100 - accuracy


@torch.no_grad()
def _cardinality_error(logits: torch.Tensor, targets: Sequence[DetrTarget]) -> torch.Tensor:
    predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
    expected = torch.as_tensor([float(len(t["labels"])) for t in targets], device=logits.device)
    return F.l1_loss(predicted, expected)


def coco_target(image: Mapping[str, Any], annotations: Iterable[Mapping[str, Any]],
                num_classes: int = 91) -> DetrTarget:
    """The loss's ground truth for one COCO image, as the official data pipeline makes it.

    ``image`` is the COCO image record (``id``, ``height``, ``width`` of the original file),
    ``annotations`` its COCO annotations (``bbox`` as x, y, w, h in pixels, ``category_id``,
    optional ``iscrowd``). As ``ConvertCocoPolysToMask`` does, crowd annotations are dropped
    (DETR does not train on them), boxes are clamped to the image and those left with zero
    width or height are dropped (their GIoU is undefined); as ``Normalize`` does, boxes
    become (cx, cy, w, h) divided by the image's width and height. invcache resizes images to
    a fixed H×W ignoring the aspect ratio, so boxes normalized by the original size are those
    of the resized image too.

    A ``category_id`` outside ``[0, num_classes)`` (crowd or not) raises :class:`UsageError`
    naming the image: the model has no logit for it, and id ``num_classes`` would silently
    be taken for no-object.
    """
    annotations = list(annotations)
    height, width = image["height"], image["width"]
    for annotation in annotations:
        category = annotation["category_id"]
        if not 0 <= category < num_classes:
            name = f" ({image['file_name']})" if "file_name" in image else ""
            raise UsageError(f"image {image['id']}{name}: category {category} is outside the model's classes "
                             f"0..{num_classes - 1}")
    kept = [a for a in annotations if not a.get("iscrowd", 0)]
    boxes = box_convert(torch.as_tensor([a["bbox"] for a in kept], dtype=torch.float32).reshape(-1, 4),
                        "xywh", "xyxy")
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    labels = torch.tensor([a["category_id"] for a in kept], dtype=torch.int64)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return DetrTarget(labels=labels[keep], boxes=box_convert(boxes[keep], "xyxy", "cxcywh") / scale)
