"""Image sources: COCO folders, webdataset shards, and the synthetic COCO-format generator.

The constants and :func:`open_split` are defined here; the other names load on first use, so
``invcache --help`` can read :data:`SYNTHETIC_IMAGES` and :data:`DEFAULT_COCO_ROOT` without torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from invcache.errors import UsageError
from invcache.lazy import lazy_exports
from invcache.settings import DEFAULT_SIZE
from invcache.workspace import TRAIN_SPLIT, VAL_SPLIT, Workspace

if TYPE_CHECKING:
    from invcache.data.coco import CocoFolder

SOURCES = ("coco", "synthetic")
DEFAULT_COCO_ROOT = "./data/coco"
# The split names the synthetic generator knows, and their sizes; another name needs an explicit size.
SYNTHETIC_IMAGES = {TRAIN_SPLIT: 64, VAL_SPLIT: 16}

# public name -> module that defines it
_EXPORTS = {
    "CocoFolder": "invcache.data.coco",
    "load_coco": "invcache.data.coco",
    "IMAGENET_MEAN": "invcache.data.preprocess",
    "IMAGENET_STD": "invcache.data.preprocess",
    "Sample": "invcache.data.preprocess",
    "normalize": "invcache.data.preprocess",
    "parse_size": "invcache.data.preprocess",
    "preprocessing_record": "invcache.data.preprocess",
    "FAULTS": "invcache.data.synthetic",
    "generate_coco": "invcache.data.synthetic",
    "WdsImages": "invcache.data.wds",
    "coco_to_wds": "invcache.data.wds",
    "shard_pattern": "invcache.data.wds",
}


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)


def default_coco_root() -> Path:
    return Path(os.environ.get("COCO_ROOT", DEFAULT_COCO_ROOT))


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

    The synthetic dataset is generated on first use (deterministically, so reuse is safe). Its
    split names are those of :data:`SYNTHETIC_IMAGES` unless ``synthetic_images`` is given: a
    typo such as ``val2071`` would otherwise quietly generate a new split.
    """
    from invcache.data.coco import CocoFolder
    from invcache.data.synthetic import generate_coco

    if source == "coco":
        return CocoFolder(coco_root if coco_root is not None else default_coco_root(), split, size)
    if source == "synthetic":
        if synthetic_images is None and split not in SYNTHETIC_IMAGES:
            raise UsageError(f"unknown synthetic split {split!r}; choose from: {', '.join(SYNTHETIC_IMAGES)} "
                             "(or give --synthetic-images N to generate a split of another name)")
        root = Workspace.at(workspace).synthetic_coco
        count = synthetic_images or SYNTHETIC_IMAGES[split]
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
    "DEFAULT_COCO_ROOT", "DEFAULT_SIZE", "FAULTS", "IMAGENET_MEAN", "IMAGENET_STD", "SOURCES", "SYNTHETIC_IMAGES",
    "CocoFolder", "Sample", "WdsImages", "coco_to_wds", "default_coco_root", "generate_coco", "load_coco",
    "normalize", "open_split", "parse_size", "preprocessing_record", "shard_pattern",
]
