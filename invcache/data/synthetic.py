"""A deterministic COCO-format dataset of simple shapes, written in the official folder layout.

Shapes stand in for real COCO categories (a red octagon is a stop sign), so every stage,
AP evaluation included, runs on a machine without COCO. Each object is drawn from the very
polygon stored as its segmentation; objects do not overlap, so every mask is exact.
On request some images are written broken or in odd modes for the bad-input tests.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from invcache.data.coco import annotation_path

CATEGORIES = (
    {"id": 6, "name": "bus", "supercategory": "vehicle", "shape": "rectangle", "color": (225, 185, 30)},
    {"id": 13, "name": "stop sign", "supercategory": "outdoor", "shape": "octagon", "color": (200, 25, 35)},
    {"id": 23, "name": "bear", "supercategory": "animal", "shape": "ellipse", "color": (105, 70, 40)},
    {"id": 38, "name": "kite", "supercategory": "sports", "shape": "triangle", "color": (40, 90, 215)},
    {"id": 53, "name": "apple", "supercategory": "food", "shape": "circle", "color": (70, 165, 50)},
)
FAULTS = ("truncated", "zero_bytes", "missing", "grayscale", "cmyk", "palette", "rgba", "gray16")
UNREADABLE_FAULTS = ("truncated", "zero_bytes", "missing")
_PNG_FAULTS = ("palette", "rgba", "gray16")


def _outline(shape: str, cx: float, cy: float, rx: float, ry: float, angle: float) -> list[tuple[float, float]]:
    if shape == "rectangle":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        return [(cx + rx * x, cy + ry * y) for x, y in corners]
    sides = {"octagon": 8, "triangle": 3, "ellipse": 40, "circle": 40}[shape]
    offset = math.pi / 8 if shape == "octagon" else angle
    if shape == "circle":
        ry = rx
    return [
        (cx + rx * math.cos(offset + 2 * math.pi * i / sides), cy + ry * math.sin(offset + 2 * math.pi * i / sides))
        for i in range(sides)
    ]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    top, bottom = rng.uniform(60, 230, size=(2, 3))
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    image = top * (1 - ramp) + bottom * ramp + rng.normal(0, 6, size=(height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _place_objects(rng: np.random.Generator, height: int, width: int) -> list[tuple[dict, list]]:
    objects, boxes = [], []
    for _ in range(int(rng.integers(1, 5))):
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        for _attempt in range(50):
            rx = rng.uniform(0.1, 0.28) * min(height, width)
            ry = rx * rng.uniform(0.6, 1.0) if category["shape"] in ("rectangle", "ellipse") else rx
            cx, cy = rng.uniform(rx + 2, width - rx - 2), rng.uniform(rx + 2, height - rx - 2)
            points = _outline(category["shape"], cx, cy, rx, ry, rng.uniform(0, 2 * math.pi))
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            box = (min(xs) - 3, min(ys) - 3, max(xs) + 3, max(ys) + 3)
            if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes):
                boxes.append(box)
                objects.append((category, points))
                break
    return objects


def _write_image(image: Image.Image, path: Path, fault: str | None) -> None:
    if fault == "missing":
        return
    if fault == "zero_bytes":
        path.write_bytes(b"")
    elif fault == "truncated":
        image.save(path, "JPEG", quality=92)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif fault == "grayscale":
        image.convert("L").save(path, "JPEG", quality=92)
    elif fault == "cmyk":
        image.convert("CMYK").save(path, "JPEG", quality=92)
    elif fault == "palette":
        image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(path, "PNG")
    elif fault == "rgba":
        rgba = image.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(image.size))
        rgba.save(path, "PNG")
    elif fault == "gray16":
        gray = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(gray).save(path, "PNG")
    else:
        image.save(path, "JPEG", quality=92)


def generate_coco(
    root: str | os.PathLike,
    split: str = "val2017",
    num_images: int = 16,
    seed: int = 0,
    faults: tuple[str, ...] = (),
    height_range: tuple[int, int] = (160, 320),
    width_range: tuple[int, int] = (200, 400),
) -> Path:
    """Write ``<root>/<split>/`` images and ``<root>/annotations/instances_<split>.json``; return the latter.

    The same arguments always give the same files. ``faults`` (names from :data:`FAULTS`)
    are applied to the 2nd, 3rd, … images in id order and listed in ``info["faults"]``.
    """
    unknown = set(faults) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}; choose from {', '.join(FAULTS)}")
    if len(faults) >= num_images:
        raise ValueError(f"{len(faults)} faults need more than {num_images} images")
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    image_dir = Path(root) / split
    image_dir.mkdir(parents=True, exist_ok=True)
    ids = sorted(int(i) for i in rng.choice(np.arange(1, 600_000), size=num_images, replace=False))
    fault_of = {ids[i + 1]: fault for i, fault in enumerate(faults)}

    images, annotations = [], []
    for image_id in ids:
        height = int(rng.integers(height_range[0], height_range[1] + 1))
        width = int(rng.integers(width_range[0], width_range[1] + 1))
        image = Image.fromarray(_background(rng, height, width), "RGB")
        draw = ImageDraw.Draw(image)
        for category, points in _place_objects(rng, height, width):
            jitter = rng.integers(-20, 21, size=3)
            draw.polygon(points, fill=tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(category["color"], jitter)))
            polygon = [round(v, 2) for point in points for v in point]
            rle = mask_utils.frPyObjects([polygon], height, width)
            xs, ys = polygon[0::2], polygon[1::2]
            box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category["id"],
                "segmentation": [polygon],
                "area": float(mask_utils.area(mask_utils.merge(rle))),
                "bbox": [round(v, 2) for v in box],
                "iscrowd": 0,
            })
        fault = fault_of.get(image_id)
        file_name = f"{image_id:012d}." + ("png" if fault in _PNG_FAULTS else "jpg")
        _write_image(image, image_dir / file_name, fault)
        images.append({
            "id": image_id, "file_name": file_name, "height": height, "width": width, "license": 1,
            "coco_url": "", "flickr_url": "", "date_captured": "2026-01-01 00:00:00",
        })

    dataset = {
        "info": {
            "description": "invcache synthetic shapes", "version": "1.0", "year": 2026,
            "seed": seed, "split": split, "faults": {str(i): f for i, f in fault_of.items()},
        },
        "licenses": [{"id": 1, "name": "CC0", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": [{k: c[k] for k in ("id", "name", "supercategory")} for c in CATEGORIES],
    }
    path = annotation_path(root, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(dataset))
    os.replace(partial, path)  # the annotation file appears only once the split is whole
    return path
