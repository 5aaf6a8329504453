"""Image perturbations applied at extraction time (SPEC §5): grayscale, and hue filters on a category's masks.

A perturbation runs on the decoded, original-size RGB uint8 image, where COCO's masks live,
before the fixed resize; its result is an ordinary cache that every analysis reads unchanged.
Plain functions on numpy arrays, so a notebook can apply exactly what an extraction applied:

- :func:`grayscale`: ITU-R 601 luma, copied to three channels;
- :func:`set_hue`: the masked pixels go uint8 → HSV (float64) → hue set or shifted → RGB →
  rounded uint8; the others are left bit-identical. ``identity`` makes the very same round
  trip with the hue unchanged: it is the colour study's control, so a filter's effect is the
  hue's alone, not the round trip's (the paper's authors compared against images that never
  went through HSV).

Masks are the union of the category's instance masks, crowd regions included: a crowd region
is that category's pixels too, and leaving it in its original colour would put both colours
of one category in one image. A mask that cannot be decoded, or whose size is not the image's,
raises :class:`~invcache.data.preprocess.ImageReadError`: that image becomes a recorded
failure of the extraction, never a crash.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from invcache.data.preprocess import ImageReadError
from invcache.errors import UsageError

GRAYSCALE = "grayscale"
HUE = "hue"
# The colour study's filters: hue set to a colour, shifted by an angle, or left as it is (the control).
HUE_SET_DEGREES = {"red": 0.0, "green": 120.0, "blue": 240.0}
HUE_SHIFT_DEGREES = {"+120": 120.0, "+240": 240.0, "identity": 0.0}
HUE_TARGETS = (*HUE_SET_DEGREES, *HUE_SHIFT_DEGREES)
TRANSFORM_SYNTAX = f"{GRAYSCALE}, {HUE}:<{'|'.join(HUE_TARGETS)}>@<category>"
# ITU-R BT.601 luma weights of R, G, B
LUMA_601 = (0.299, 0.587, 0.114)
# A polygon vertex further outside the image than this many image sizes is not an annotation of it
# (pycocotools' rasterizer allocates in proportion to the polygon's extent, and hangs on NaN).
POLYGON_MARGIN = 1.0

_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9._@-]+")
# names whose slug (spaces as "-") reads back unambiguously; any other name gets a checksum in its slug
_SLUG_PLAIN = re.compile(r"[A-Za-z0-9._]+( [A-Za-z0-9._]+)*")


@dataclass(frozen=True)
class Transform:
    """One perturbation: ``grayscale``, or a hue filter on one category's instance masks.

    ``category_id`` is set by :func:`resolve_transforms` from the annotation file; a hue
    transform needs it to find its masks.
    """

    name: str
    target: str | None = None
    category: str | None = None
    category_id: int | None = None

    def __post_init__(self) -> None:
        if self.name not in (GRAYSCALE, HUE):
            raise UsageError(f"unknown transform {self.name!r}; choose from: {TRANSFORM_SYNTAX}")
        if self.name == HUE and (self.target not in HUE_TARGETS or not self.category):
            raise UsageError(f"a hue transform needs a target ({', '.join(HUE_TARGETS)}) and a category, not "
                             f"{self.target!r} and {self.category!r}")

    @property
    def text(self) -> str:
        """The ``--transform`` syntax of this transform, e.g. ``hue:red@stop sign``."""
        return self.name if self.name == GRAYSCALE else f"{HUE}:{self.target}@{self.category}"

    @property
    def slug(self) -> str:
        """A file-name-safe short name (``grayscale``, ``hue-red@stop-sign``, ``hue-plus120@stop-sign``)."""
        if self.name == GRAYSCALE:
            return GRAYSCALE
        target = str(self.target).replace("+", "plus")
        category = str(self.category)
        readable = _SLUG_UNSAFE.sub("-", category).strip("-") or "category"
        if not _SLUG_PLAIN.fullmatch(category):  # the readable name loses something: make it unique
            readable += f"-{zlib.crc32(category.encode()):08x}"
        return f"{HUE}-{target}@{readable}"

    def record(self) -> dict:
        """What a cache records about this transform (its ``perturbation`` attribute lists these)."""
        if self.name == GRAYSCALE:
            return {"text": self.text, "name": self.name}
        return {"text": self.text, "name": self.name, "target": self.target, "category": self.category,
                "category_id": self.category_id}

    def apply(self, image: np.ndarray, annotations: Sequence[dict]) -> np.ndarray:
        """This transform of an (H, W, 3) uint8 image whose COCO ``annotations`` are given."""
        if self.name == GRAYSCALE:
            return grayscale(image)
        if self.category_id is None:
            raise UsageError(f"transform {self.text!r} is not resolved against an annotation file "
                             "(use resolve_transforms)")
        mask = category_mask(annotations, self.category_id, image.shape[0], image.shape[1])
        return set_hue(image, mask, self.target)


def parse_transform(text: str) -> Transform:
    """``grayscale`` or ``hue:<target>@<category>`` as a :class:`Transform` (its category not yet resolved)."""
    name, _, rest = text.strip().partition(":")
    if name == GRAYSCALE and not rest:
        return Transform(GRAYSCALE)
    if name != HUE:
        raise UsageError(f"unknown transform {text!r}; choose from: {TRANSFORM_SYNTAX}")
    target, at, category = rest.partition("@")
    target, category = target.strip(), category.strip()
    if not at or not category:
        raise UsageError(f"bad transform {text!r}: expected {HUE}:<{'|'.join(HUE_TARGETS)}>@<category>, "
                         "e.g. hue:red@stop sign")
    if target not in HUE_TARGETS:
        raise UsageError(f"unknown hue target {target!r} in {text!r}; choose from: {', '.join(HUE_TARGETS)}")
    return Transform(HUE, target, category)


def resolve_transforms(texts: Iterable[str], coco: COCO | None) -> tuple[Transform, ...]:
    """Parse ``texts`` and give each hue transform its category id from ``coco``'s categories.

    Everything that would make a hue transform meaningless is refused here, before any image
    is read: a category the annotations do not name, a category none of whose annotations
    carries a ``segmentation`` (nothing to recolour), or a source without categories
    (``coco`` None: webdataset shards store each image's annotations but not the category
    names).
    """
    transforms = tuple(parse_transform(text) for text in texts)
    hue = [t for t in transforms if t.name == HUE]
    if not hue:
        return transforms
    if coco is None:
        raise UsageError(f"transform {hue[0].text!r} needs the annotations' category names, which webdataset "
                         "shards do not store: extract from the COCO folder (--coco-root) instead")
    ids = category_ids(coco)
    segmented = {a["category_id"] for a in coco.anns.values() if a.get("segmentation")}
    resolved = []
    for transform in transforms:
        if transform.name == HUE:
            if transform.category not in ids:
                raise UsageError(f"unknown category {transform.category!r} in {transform.text!r}; the annotations "
                                 f"have: {', '.join(sorted(ids)) or 'no category'}")
            if ids[transform.category] not in segmented:
                raise UsageError(f"no annotation of {transform.category!r} in this split carries a segmentation, so "
                                 f"{transform.text!r} has no mask to recolour")
            transform = Transform(HUE, transform.target, transform.category, ids[transform.category])
        resolved.append(transform)
    return tuple(resolved)


def category_ids(coco: COCO) -> dict[str, int]:
    """Category name → id of an annotation file (categories without a name are left out).

    A name two categories share is refused (one line naming both ids): masks, selection and AP
    must all mean the same category.
    """
    ids: dict[str, int] = {}
    for category in coco.cats.values():
        name = category.get("name")
        if not isinstance(name, str):
            continue
        if name in ids and ids[name] != category["id"]:
            raise UsageError(f"the annotations name two categories {name!r} (ids {ids[name]} and {category['id']}); "
                             "a category name must say which one")
        ids[name] = category["id"]
    return ids


def apply_transforms(image: np.ndarray, transforms: Sequence[Transform], annotations: Sequence[dict]) -> np.ndarray:
    """``transforms`` applied in order to an (H, W, 3) uint8 image with its COCO ``annotations``."""
    for transform in transforms:
        image = transform.apply(image, annotations)
    return image


def grayscale(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 → ITU-R 601 luma Y = 0.299 R + 0.587 G + 0.114 B, rounded, in all three channels.

    Three equal channels keep the model's input shape; DETR then sees a gray image as a
    gray photograph would reach it.
    """
    r, g, b = (image[..., k].astype(np.float64) for k in range(3))
    luma = LUMA_601[0] * r + LUMA_601[1] * g + LUMA_601[2] * b
    gray = np.clip(np.rint(luma), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(…, 3) RGB in [0, 1] → (hue in [0, 1), saturation, value), float64, as :mod:`colorsys` computes them."""
    rgb = np.asarray(rgb, dtype=np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc, minc = rgb.max(axis=-1), rgb.min(axis=-1)
    spread = maxc - minc
    gray = spread == 0
    safe = np.where(gray, 1.0, spread)
    saturation = np.where(gray, 0.0, spread / np.where(maxc == 0, 1.0, maxc))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = np.where(r == maxc, bc - gc, np.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = np.where(gray, 0.0, (hue / 6.0) % 1.0)
    return hue, saturation, maxc


def hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """(hue in [0, 1), saturation, value) → (…, 3) RGB in [0, 1], float64, as :mod:`colorsys` computes it."""
    hue, saturation, value = (np.asarray(x, dtype=np.float64) for x in (hue, saturation, value))
    sector = np.floor(hue * 6.0)
    f = hue * 6.0 - sector
    p = value * (1.0 - saturation)
    q = value * (1.0 - saturation * f)
    t = value * (1.0 - saturation * (1.0 - f))
    sector = sector.astype(np.int64) % 6
    # (r, g, b) of each of the six sectors of the hue circle
    channels = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)]
    return np.stack([np.choose(sector, [c[k] for c in channels]) for k in range(3)], axis=-1)


def set_hue(image: np.ndarray, mask: np.ndarray, target: str) -> np.ndarray:
    """The pixels of ``mask`` with their hue set to red/green/blue, shifted by +120°/+240°, or kept (identity).

    Masked pixels go uint8 → HSV (float64) → RGB → rounded uint8, ``identity`` included, so the
    control differs from the filters by the hue alone; unmasked pixels are copied bit for bit.
    Saturation and value are kept, so gray pixels (saturation 0) stay as they are.
    """
    if target not in HUE_TARGETS:
        raise UsageError(f"unknown hue target {target!r}; choose from: {', '.join(HUE_TARGETS)}")
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"a {mask.shape} mask for a {image.shape[:2]} image")
    out = image.copy()
    if not mask.any():
        return out
    hue, saturation, value = rgb_to_hsv(image[mask] / 255.0)
    if target in HUE_SET_DEGREES:
        hue = np.full_like(hue, HUE_SET_DEGREES[target] / 360.0)
    else:
        hue = (hue + HUE_SHIFT_DEGREES[target] / 360.0) % 1.0
    out[mask] = np.clip(np.rint(hsv_to_rgb(hue, saturation, value) * 255.0), 0, 255).astype(np.uint8)
    return out


def category_mask(annotations: Sequence[dict], category_id: int, height: int, width: int) -> np.ndarray:
    """(height, width) bool: the union of the masks of every annotation of ``category_id``, crowd ones included.

    Polygons, uncompressed RLE and compressed RLE all work (pycocotools). A mask that cannot be
    decoded, or whose recorded size is not (height, width), raises ImageReadError naming the
    annotation.
    """
    if not isinstance(annotations, (list, tuple)):
        raise ImageReadError(f"the annotations of this image are a {type(annotations).__name__}, not a list")
    union = np.zeros((height, width), dtype=bool)
    for annotation in annotations:
        if not isinstance(annotation, dict):
            raise ImageReadError(f"an annotation of this image is a {type(annotation).__name__}, not an object")
        if annotation.get("category_id") == category_id:
            mask = instance_mask(annotation, height, width)
            if mask is not None:
                union |= mask
    return union


def instance_mask(annotation: dict, height: int, width: int) -> np.ndarray | None:
    """(height, width) bool mask of one annotation's ``segmentation``, None if it has none."""
    rle = instance_rle(annotation, height, width)
    return None if rle is None else mask_utils.decode(rle).astype(bool)


def instance_rle(annotation: dict, height: int, width: int) -> dict | None:
    """One annotation's ``segmentation`` as a compressed RLE of a (height, width) image, None if it has none.

    The segmentation is checked before pycocotools sees it: pycocotools decodes a run-length
    encoding whose counts do not add up to the image into uninitialised memory, and hangs or
    exhausts memory on a polygon with NaN or far-away vertices; such a segmentation raises
    ImageReadError naming the annotation. Polygon parts with fewer than three points enclose
    nothing and are skipped.
    """
    segmentation = annotation.get("segmentation")
    if segmentation is None or segmentation == [] or segmentation == {}:
        return None
    where = f"annotation {annotation.get('id')!r}"
    if isinstance(segmentation, list):
        polygons = [_checked_polygon(p, height, width, where) for p in segmentation]
        polygons = [p for p in polygons if len(p) >= 6]
        if not polygons:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict):
        rle = _checked_rle(segmentation, height, width, where)
    else:
        raise ImageReadError(f"{where}: its segmentation is a {type(segmentation).__name__}, neither polygons nor RLE")
    return rle


def _checked_polygon(polygon: object, height: int, width: int, where: str) -> list[float]:
    if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
        raise ImageReadError(f"{where}: a polygon of its segmentation is not a list of numbers")
    if len(polygon) % 2:
        raise ImageReadError(f"{where}: a polygon of its segmentation has an odd number of coordinates")
    xs, ys = polygon[0::2], polygon[1::2]
    for values, extent in ((xs, width), (ys, height)):
        # compared before any float conversion: a JSON integer may be too large for a float
        if not all((isinstance(v, int) or math.isfinite(v)) and -POLYGON_MARGIN * extent <= v
                   <= (1 + POLYGON_MARGIN) * extent for v in values):
            raise ImageReadError(f"{where}: its polygon has a vertex far outside the {height}x{width} image (or not "
                                 "finite)")
    return [float(v) for v in polygon]


def _checked_rle(segmentation: dict, height: int, width: int, where: str) -> dict:
    size, counts = segmentation.get("size"), segmentation.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(v) for v in size)):
        raise ImageReadError(f"{where}: its RLE has no size [height, width]")
    if list(size) != [height, width]:
        raise ImageReadError(f"{where}: its mask is {size[0]}x{size[1]}, the image {height}x{width}")
    if isinstance(counts, list):
        if not all(_is_int(c) and c >= 0 for c in counts):
            raise ImageReadError(f"{where}: its RLE counts are not non-negative integers")
        runs = counts
    elif isinstance(counts, (str, bytes)):
        text = counts.decode("ascii", errors="replace") if isinstance(counts, bytes) else counts
        runs = _string_counts(text)
        if runs is None:
            raise ImageReadError(f"{where}: its compressed RLE counts cannot be decoded")
        counts = text.encode("ascii")
    else:
        raise ImageReadError(f"{where}: its RLE has no counts")
    if sum(runs) != height * width:
        raise ImageReadError(f"{where}: its RLE covers {sum(runs)} pixels, the {height}x{width} image "
                             f"{height * width}")
    if isinstance(counts, list):
        return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return {"size": [height, width], "counts": counts}


def _string_counts(text: str) -> list[int] | None:
    """The run lengths of COCO's compressed RLE string (pycocotools' ``rleFrString``), None if malformed."""
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                return None
            c = ord(text[position]) - 48
            if not 0 <= c < 64:
                return None
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            position += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        if value < 0:
            return None
        counts.append(value)
    return counts


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
