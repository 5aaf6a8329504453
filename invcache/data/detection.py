"""COCO-format detection data for training DETR itself: the cache's input image and DETR's ground truth.

Images are exactly what extraction stores as ``input`` (SPEC §1: decoded, RGB, resized to H×W
ignoring the aspect ratio, uint8; :class:`invcache.data.coco.CocoFolder` and
:mod:`invcache.data.preprocess`), so a DETR trained here sees the images its caches will hold.
Targets are the official ones (:func:`invcache.models.loss.coco_target`): crowd annotations and
degenerate boxes dropped, boxes as (cx, cy, w, h) normalized by the image size, which the
aspect-ignoring resize leaves valid. The only augmentation is the official random horizontal
flip (DETR's random resizes and crops would break the fixed size); whether an image is flipped
depends only on (seed, epoch, image id), and the order of an epoch only on (seed, epoch), so a
run resumed at an epoch boundary reads what the uninterrupted run reads.
"""

from __future__ import annotations

import hashlib
import math
import numbers

import torch
from pycocotools.coco import COCO

from invcache.data.coco import CocoFolder
from invcache.errors import UsageError
from invcache.models.loss import coco_target


class DetectionImages(torch.utils.data.Dataset):
    """One split as DETR's loss reads it: each item is :class:`CocoFolder`'s (``image_id``, ``input``,
    ``orig_size``, ``valid``, ``error``) plus ``labels`` and ``boxes``; flipped when ``flip`` draws so.

    Every annotation of the split is checked up front (:func:`check_annotations`), so a category
    the model has no class for is one line naming the image before any training, not an error
    inside a DataLoader worker. An unreadable image stays an item with ``valid`` False (and no
    boxes): :func:`collate` leaves it out of the batch and names it.
    """

    def __init__(self, images: CocoFolder, num_classes: int, seed: int = 0, flip: bool = False) -> None:
        check_annotations(images.coco, images.image_ids, num_classes, str(images.annotation_file))
        self.images = images
        self.num_classes = num_classes
        self.seed = seed
        self.flip = flip
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose flips the next DataLoader iterator draws (workers copy the dataset then)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def flipped(self, image_id: int) -> bool:
        """Whether ``image_id`` is flipped this epoch: a hash of (seed, epoch, id), the same in every process."""
        digest = hashlib.blake2b(f"{self.seed}:{self.epoch}:{image_id}".encode(), digest_size=1).digest()
        return self.flip and digest[0] & 1 == 1

    def __getitem__(self, index: int) -> dict:
        sample = self.images[index]
        image_id = sample["image_id"]
        if not sample["valid"]:
            return {**sample, "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
        height, width = sample["orig_size"].tolist()
        # Normalized by the decoded image's size, as the official pipeline does (it reads the PIL image's size).
        record = {**self.images.coco.imgs[image_id], "height": height, "width": width}
        target = coco_target(record, self.images.coco.imgToAnns.get(image_id, []), self.num_classes)
        boxes = target["boxes"]
        if self.flipped(image_id):
            sample["input"] = sample["input"].flip(1)  # (H, W, 3): mirror the width
            boxes = boxes * torch.tensor([-1.0, 1.0, 1.0, 1.0]) + torch.tensor([1.0, 0.0, 0.0, 0.0])
        return {**sample, "labels": target["labels"], "boxes": boxes}


def check_annotations(coco: COCO, image_ids: list[int], num_classes: int, where: str) -> None:
    """Refuse, naming the image, an annotation DETR's targets cannot be made from.

    A ``category_id`` outside ``[0, num_classes)`` has no logit (and ``num_classes`` itself would
    be taken for no-object); a ``bbox`` that is not four finite numbers cannot be a box. Crowd
    annotations are checked too: :func:`coco_target` refuses their categories as well.
    """
    for image_id in image_ids:
        for annotation in coco.imgToAnns.get(image_id, []):
            category, box = annotation.get("category_id"), annotation.get("bbox")
            if not 0 <= category < num_classes:
                problem = f"category {category} is outside the model's classes 0..{num_classes - 1}"
            elif not (isinstance(box, list) and len(box) == 4
                      and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                              for v in box)):
                problem = f"annotation {annotation.get('id')} has the bbox {box!r}, not [x, y, width, height]"
            else:
                continue
            name = coco.imgs[image_id].get("file_name")
            raise UsageError(f"image {image_id}{f' ({name})' if name else ''} in {where}: {problem}")


def collate(samples: list[dict]) -> dict:
    """A batch of the readable samples: ``input`` uint8 (B, H, W, 3), ``orig_size`` (B, 2), ``image_id``
    and ``targets`` (lists); ``skipped`` lists (image id, reason) of the unreadable ones left out."""
    valid = torch.tensor([s["valid"] for s in samples], dtype=torch.bool)
    kept = [s for s in samples if s["valid"]]
    return {
        "input": torch.stack([s["input"] for s in samples])[valid],
        "orig_size": torch.stack([s["orig_size"] for s in samples])[valid],
        "image_id": [s["image_id"] for s in kept],
        "targets": [{"labels": s["labels"], "boxes": s["boxes"]} for s in kept],
        "skipped": [(s["image_id"], s["error"]) for s in samples if not s["valid"]],
    }


def epoch_indices(count: int, seed: int, epoch: int, rank: int = 0, world: int = 1, shuffle: bool = True,
                  equal_shares: bool = True) -> list[int]:
    """This process's dataset indices for one epoch, as :class:`torch.utils.data.DistributedSampler` draws them.

    A permutation drawn from ``seed + epoch`` (or the dataset's order without ``shuffle``); with
    ``equal_shares`` it is padded to a multiple of ``world`` by repeating its first indices, so
    every rank takes the same number of steps (at most ``world - 1`` images read twice an
    epoch); rank ``r`` takes every ``world``-th index from the ``r``-th. Without ``equal_shares``
    (validation) each index is taken exactly once, the shares differing by at most one.
    """
    if shuffle:
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    else:
        order = list(range(count))
    if equal_shares and order:
        total = math.ceil(count / world) * world
        order = (order * math.ceil(total / count))[:total]
    return order[rank::world]
