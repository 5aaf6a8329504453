"""Decoding and the fixed preprocessing of SPEC §1: RGB conversion, resize to H×W in uint8, normalization.

The uint8 resized image is what the cache stores as ``input``; :func:`normalize` turns it
into exactly what the model sees, so the stored image reproduces every tap.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from invcache.errors import UsageError

if TYPE_CHECKING:  # transforms imports this module (ImageReadError)
    from invcache.data.transforms import Transform

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESAMPLE = "bilinear"
SIZE_MULTIPLE = 32


def parse_size(text: str) -> tuple[int, int]:
    """``"480x640"`` -> (480, 640): height × width, each a positive multiple of 32."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UsageError(f"bad size {text!r}: expected HxW, e.g. 480x640")
    return check_size((int(parts[0]), int(parts[1])), text)


def check_size(size: tuple[int, int], text: str | None = None) -> tuple[int, int]:
    """``size`` as (height, width) if both are positive multiples of 32, else a UsageError."""
    if isinstance(size, str) or len(size) != 2 or not all(isinstance(v, int) for v in size):
        raise UsageError(f"bad size {size!r}: expected (height, width) integers, e.g. (480, 640)")
    h, w = size
    if h <= 0 or w <= 0 or h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        shown = text if text is not None else f"{h}x{w}"
        raise UsageError(f"bad size {shown!r}: height and width must be positive multiples of {SIZE_MULTIPLE}")
    return h, w


def preprocessing_record(size: tuple[int, int]) -> dict:
    """What a cache records about how its images were made."""
    return {
        "size": list(size),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "resample": RESAMPLE,
        "color": "RGB (gray/CMYK/palette converted; alpha dropped; 16-bit scaled)",
    }


class ImageReadError(Exception):
    """An image that cannot be decoded; its message is the recorded failure reason."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    16-bit and 32-bit integer images are scaled to 8 bits (PIL's own conversion clips them);
    alpha is dropped, as torchvision's readers do.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        gray = np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "F":
        gray = np.clip(np.rint(np.asarray(image) * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(source: str | os.PathLike | bytes) -> Image.Image:
    """Fully decode an image file or its bytes to RGB; any failure raises ImageReadError with the reason."""
    try:
        if isinstance(source, bytes):
            if not source:
                raise ImageReadError("empty file (0 bytes)")
            handle = io.BytesIO(source)
        else:
            if not os.path.exists(source):
                raise ImageReadError(f"missing file {os.fspath(source)}")
            if os.path.getsize(source) == 0:
                raise ImageReadError(f"empty file (0 bytes) {os.fspath(source)}")
            handle = source
        with Image.open(handle) as image:
            image.load()
            return to_rgb(image)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"unreadable image: {exc}") from None


def resize_uint8(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8, resized with PIL's antialiased bilinear filter, aspect ratio ignored (as in the paper)."""
    h, w = size
    return np.array(image.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)


def unit_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [0, 1] (NHWC-strided: convolutions like that on GPU)."""
    return images.permute(0, 3, 1, 2).float().div(255.0)


def normalize_unit(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (B, 3, H, W) -> normalized with ImageNet's mean and std."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) on any device -> float32 (B, 3, H, W): exactly what the model sees."""
    return normalize_unit(unit_images(images))


@dataclass
class Sample:
    """One image ready for DETR, or a recorded failure (``valid`` False, zeros, ``error`` says why)."""

    image_id: int
    input: np.ndarray  # (H, W, 3) uint8
    orig_size: tuple[int, int]  # (H, W) before resizing
    valid: bool
    error: str = ""

    def as_dict(self) -> dict:
        return {
            "image_id": self.image_id,
            "input": torch.from_numpy(self.input),
            "orig_size": torch.tensor(self.orig_size, dtype=torch.int32),
            "valid": self.valid,
            "error": self.error,
        }


def failed_sample(image_id: int, record: dict, size: tuple[int, int], reason: str) -> Sample:
    """The recorded failure for an image that was not read: zeros, ``orig_size`` from its annotation record."""
    fallback = (int(record.get("height", 0)), int(record.get("width", 0)))
    return Sample(image_id, np.zeros((*size, 3), np.uint8), fallback, False, reason)


def load_sample(
    image_id: int, source: str | os.PathLike | bytes, record: dict, size: tuple[int, int],
    transforms: Sequence[Transform] = (), annotations: Sequence[dict] = (),
) -> Sample:
    """Decode, perturb and resize one image; an unreadable one becomes an invalid sample that keeps its reason.

    ``transforms`` (SPEC §5) run on the decoded original-size image, where the image's COCO
    ``annotations`` (their masks) live, before the resize. A transform that cannot be applied
    (an undecodable mask) fails the image like an unreadable file.
    """
    try:
        image = decode_image(source)
        if transforms:
            pixels = np.asarray(image)
            for transform in transforms:
                pixels = transform.apply(pixels, annotations)
            image = Image.fromarray(pixels, "RGB")
    except ImageReadError as exc:
        return failed_sample(image_id, record, size, str(exc))
    return Sample(image_id, resize_uint8(image, size), (image.height, image.width), True)
