"""COCO in the official folder layout: ``<root>/<split>/*.jpg`` and ``<root>/annotations/instances_<split>.json``."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import torch
from pycocotools.coco import COCO

from invcache.data.preprocess import load_sample
from invcache.errors import UsageError
from invcache.hashing import file_sha256
from invcache.settings import DEFAULT_SIZE

COCO_HELP = (
    "get COCO 2017 from https://cocodataset.org/#download (images and annotations unpacked under "
    "--coco-root or $COCO_ROOT), or run with --source synthetic"
)


def annotation_path(root: str | os.PathLike, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def load_coco(annotation_file: str | os.PathLike) -> COCO:
    """pycocotools' COCO without its progress prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(annotation_file))


class CocoFolder(torch.utils.data.Dataset):
    """One split of a COCO-format folder, images in ascending id order, resized to ``size``.

    Each item is :meth:`Sample.as_dict`: an unreadable image is an item with ``valid`` False
    and its reason in ``error``, never an exception.
    """

    def __init__(
        self, root: str | os.PathLike, split: str, size: tuple[int, int] = DEFAULT_SIZE, kind: str = "coco"
    ) -> None:
        self.root = Path(root)
        self.kind = kind
        self.split = split
        self.size = size
        self.annotation_file = annotation_path(root, split)
        self.image_dir = self.root / split
        if not self.annotation_file.is_file():
            raise UsageError(f"COCO {split} not found: no {self.annotation_file}; {COCO_HELP}")
        if not self.image_dir.is_dir():
            raise UsageError(f"COCO {split} not found: no image folder {self.image_dir}; {COCO_HELP}")
        self.coco = load_coco(self.annotation_file)
        self.image_ids = sorted(self.coco.getImgIds())

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.image_ids[index]
        record = self.coco.imgs[image_id]
        return load_sample(image_id, self.image_dir / record["file_name"], record, self.size).as_dict()

    def source_record(self) -> dict:
        """Provenance of this source for a cache's attributes."""
        return {
            "kind": self.kind,
            "root": str(self.root.resolve()),
            "split": self.split,
            "annotation_file": str(self.annotation_file.resolve()),
            "annotation_sha256": file_sha256(self.annotation_file),
            "images": len(self),
        }
