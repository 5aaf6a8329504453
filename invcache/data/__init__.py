"""Image sources: COCO folders, webdataset shards, and the synthetic COCO-format generator."""

from __future__ import annotations

import os
from pathlib import Path

from invcache.data.coco import CocoFolder, load_coco
from invcache.data.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Sample,
    normalize,
    parse_size,
    preprocessing_record,
)
from invcache.data.synthetic import FAULTS, generate_coco
from invcache.data.wds import WdsImages, coco_to_wds
from invcache.errors import UsageError
from invcache.settings import DEFAULT_SIZE
from invcache.workspace import Workspace

SOURCES = ("coco", "synthetic")
SYNTHETIC_IMAGES = {"train2017": 64, "val2017": 16}


def default_coco_root() -> Path:
    return Path(os.environ.get("COCO_ROOT", "./data/coco"))


def open_split(
    source: str,
    split: str,
    *,
    coco_root: str | os.PathLike | None = None,
    workspace: str | os.PathLike | None = None,
    size: tuple[int, int] = DEFAULT_SIZE,
    synthetic_images: int | None = None,
) -> CocoFolder:
    """The dataset of one split: a COCO folder, or the synthetic dataset in ``<workspace>/synthetic-coco``.

    The synthetic dataset is generated on first use (deterministically, so reuse is safe).
    """
    if source == "coco":
        return CocoFolder(coco_root if coco_root is not None else default_coco_root(), split, size)
    if source == "synthetic":
        root = Workspace.at(workspace).synthetic_coco
        count = synthetic_images or SYNTHETIC_IMAGES.get(split, 16)
        annotation = root / "annotations" / f"instances_{split}.json"
        if not annotation.is_file():
            generate_coco(root, split, num_images=count)
        dataset = CocoFolder(root, split, size, kind="synthetic")
        if synthetic_images is not None and len(dataset) != synthetic_images:
            raise UsageError(f"the synthetic {split} in {root} has {len(dataset)} images, not {synthetic_images}; "
                             f"remove {root / split} and {annotation} to generate it anew")
        return dataset
    raise UsageError(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}")


__all__ = [
    "DEFAULT_SIZE", "FAULTS", "IMAGENET_MEAN", "IMAGENET_STD", "CocoFolder", "Sample", "WdsImages",
    "coco_to_wds", "default_coco_root", "generate_coco", "load_coco", "normalize",
    "open_split", "parse_size", "preprocessing_record",
]
