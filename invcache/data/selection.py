"""Which images of a split a run reads: the colour study's selection rule, and files of image ids.

An ids file (``extract --ids-file``) lists one COCO image id per line; ``#`` starts a comment,
so a file can say how its ids were chosen. :func:`select_images` chooses the colour study's
images (SPEC §5); :func:`ids_file_text` writes the choice down (``analyze color`` keeps it beside
its results), so an extraction of exactly those images can be rerun or resumed.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from invcache.data.preprocess import ImageReadError
from invcache.data.transforms import category_ids, instance_rle
from invcache.errors import UsageError

log = logging.getLogger(__name__)

_ID = re.compile(r"[0-9]+")
_SHOWN = 5  # ids a message names before it says how many more there are


def select_images(coco: COCO, category: str, min_area: float = 0.3,
                  image_ids: Iterable[int] | None = None) -> list[int]:
    """Ascending ids of the images in which one instance of ``category`` (not crowd) covers ≥ ``min_area`` of the image.

    The rule of the paper's colour study: an object large enough that recolouring it changes
    the image. The area is that of the instance's mask, computed with pycocotools from its
    segmentation (not the annotation's ``area`` field, which nothing checks), as a fraction of
    the original image. Resizing ignores the aspect ratio and scales both axes uniformly, so the
    fraction is the same in the resized image DETR sees. ``image_ids`` restricts the choice (to
    the valid images of a cache, say). An instance whose mask cannot be decoded is not counted
    (and logged). A category the annotations do not name, a threshold outside (0, 1], or one
    that selects nothing is a UsageError; the last names the largest fraction found, the
    threshold that would select at least one image.
    """
    if not 0 < min_area <= 1:
        raise UsageError(f"bad minimum area {min_area!r}: a fraction of the image in (0, 1]")
    names = category_ids(coco)
    if category not in names:
        raise UsageError(f"unknown category {category!r}; the annotations have: "
                         f"{', '.join(sorted(names)) or 'no category'}")
    category_id = names[category]
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    chosen: set[int] = set()
    largest, undecodable = 0.0, 0
    for annotation in coco.anns.values():
        image_id = annotation["image_id"]
        if annotation["category_id"] != category_id or annotation.get("iscrowd"):
            continue
        if image_id not in coco.imgs or (wanted is not None and image_id not in wanted):
            continue
        height, width = coco.imgs[image_id].get("height"), coco.imgs[image_id].get("width")
        try:
            if not height or not width:
                raise ImageReadError(f"image {image_id} has no height and width")
            rle = instance_rle(annotation, height, width)
        except ImageReadError as exc:
            undecodable += 1
            log.warning(f"select_images: {exc}; not counted")
            continue
        if rle is None:
            continue
        fraction = float(mask_utils.area(rle)) / (height * width)
        largest = max(largest, fraction)
        if fraction >= min_area:
            chosen.add(image_id)
    if not chosen:
        among = "" if wanted is None else f" among the {len(wanted)} images given"
        raise UsageError(f"no image has an instance of {category!r} (not crowd) covering ≥ {min_area:g} of it{among}; "
                         f"the largest covers {largest:.4g}")
    return sorted(chosen)


def restrict_ids(available: Sequence[int], wanted: Iterable[int], split: str) -> list[int]:
    """``wanted`` ascending and once each, all of them ids of ``available``; else a UsageError naming the first few."""
    ids = sorted({int(i) for i in wanted})
    if not ids:
        raise UsageError(f"no image id given to restrict {split} to")
    have = set(available)
    missing = [i for i in ids if i not in have]
    if missing:
        more = f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
        raise UsageError(f"{len(missing)} image id(s) not in {split}: {', '.join(map(str, missing[:_SHOWN]))}{more}")
    return ids


def ids_file_text(ids: Iterable[int], header: str) -> str:
    """The text of an ids file: ``header`` as ``#`` comment lines, then one id per line, in the order given."""
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    return comments + "".join(f"{int(i)}\n" for i in ids)


def read_ids_file(path: str | os.PathLike) -> list[int]:
    """The ids of an ids file, in file order; anything else on a line than an id and a comment is a UsageError."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a BOM is not part of an id
    except FileNotFoundError:
        raise UsageError(f"ids file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"ids file {path} is a folder") from None
    except UnicodeDecodeError:
        raise UsageError(f"ids file {path} is not text: one image id per line expected") from None
    ids = []
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if not _ID.fullmatch(text):
            shown = text if len(text) <= 40 else text[:37] + "..."
            raise UsageError(f"{path} line {number}: {shown!r} is not an image id (one id per line; # starts a "
                             "comment)")
        ids.append(int(text))
    if not ids:
        raise UsageError(f"ids file {path} lists no image id")
    return ids
