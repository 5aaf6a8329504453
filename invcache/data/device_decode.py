"""The device decode path: JPEG bytes decoded in batches on the model's device and resized there.

Only compressed bytes cross to the GPU (``torchvision.io.decode_jpeg(..., device="cuda")``,
nvjpeg), and no worker process ships pixels. Each image of a batch takes one of three ways:

1. the device decoder, for the JPEGs it is trusted with (``invcache.data.jpeg_header``), all of
   a batch in one call; if that call fails, each of its images is tried alone, so one bad
   file does not send the whole batch to the CPU;
2. the CPU path for the image (its ``EncodedImage.cpu_sample``: PIL, exactly what a DataLoader
   item is), for every other file and for an image the device decoder rejected;
3. a recorded failure, where the CPU path records one (same reason, same all-zero row).

Resizing is Pillow's bilinear bit for bit (``invcache.data.pil_resize``), so the two paths give
the same pixels from the same decoded image; what differs on a GPU is nvjpeg's decoding
(its IDCT and chroma upsampling are not libjpeg's). The batch handed on is what the model
is fed, and the cache stores that very tensor as ``input``.

``device`` is a parameter, so the whole path runs on the CPU too (torchvision decodes lists
there with libjpeg-turbo); ``batch_decoder`` can be replaced, e.g. by one that fails, to
exercise the fallbacks.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from invcache.data.encoded import EncodedImage
from invcache.data.jpeg_header import device_refusal, read_jpeg_header
from invcache.data.pil_resize import resize_like_pil

log = logging.getLogger(__name__)

# (encoded JPEGs as 1-D uint8 CPU tensors, device) -> decoded (3, H, W) uint8 tensors on that device
BatchDecoder = Callable[[list[torch.Tensor], torch.device], Sequence[torch.Tensor]]
REJECTED = "rejected by the device decoder"


def torchvision_decoder(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's batched JPEG decoder: nvjpeg on CUDA, libjpeg-turbo on the CPU; always RGB."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


@dataclass
class Prepared:
    """An image after the reader thread: its bytes for the device decoder, or its sample from the CPU path."""

    row: int
    image_id: int
    data: torch.Tensor | None = None
    header_size: tuple[int, int] | None = None  # (H, W) its frame header gives
    sample: dict | None = None
    route: str = ""  # why it took the CPU path (empty: sent to the device)
    encoded: EncodedImage | None = None


@dataclass
class DecodeCounts:
    """How many images the device decoded, and how many the CPU path read, by reason."""

    device: int = 0
    cpu: Counter = field(default_factory=Counter)

    def record(self) -> dict:
        return {"images_on_device": self.device, "images_on_cpu": dict(self.cpu)}


class DeviceDecoder:
    """Turns lists of :class:`EncodedImage` into batches on ``device``, laid out as the DataLoader's.

    :meth:`prepare` runs in the reader threads (it reads no file: it parses headers and runs the
    CPU path for what the device will not get); :meth:`batch` runs in the thread that forwards.
    """

    def __init__(self, size: tuple[int, int], device: torch.device | str,
                 batch_decoder: BatchDecoder | None = None) -> None:
        self.size = size
        self.device = torch.device(device)
        self.batch_decoder = batch_decoder or torchvision_decoder  # looked up now, so tests can replace it
        self.counts = DecodeCounts()
        self._max_pixels = _pil_pixel_limit()

    def prepare(self, encoded: EncodedImage) -> Prepared:
        prepared = Prepared(encoded.row, encoded.image_id, encoded=encoded)
        if encoded.data is None:
            prepared.route = "file not read"
        else:
            prepared.route = device_refusal(encoded.data, self._max_pixels) or ""
        if prepared.route:
            prepared.sample = encoded.cpu_sample()
            return prepared
        header = read_jpeg_header(encoded.data)
        prepared.header_size = (header.height, header.width)
        prepared.data = torch.frombuffer(encoded.data, dtype=torch.uint8)
        return prepared

    def batch(self, items: Sequence[Prepared]) -> dict:
        """The batch of ``items``: ``input`` (B, H, W, 3) uint8 on the device; the rest on the CPU."""
        height, width = self.size
        inputs = torch.zeros((len(items), height, width, 3), dtype=torch.uint8, device=self.device)
        orig_size = torch.zeros((len(items), 2), dtype=torch.int32)
        valid = torch.zeros(len(items), dtype=torch.bool)
        errors = [""] * len(items)
        on_device = [i for i, item in enumerate(items) if item.sample is None]
        decoded = self._decode([items[i] for i in on_device])
        by_size: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        for i, image in zip(on_device, decoded, strict=True):
            if image is None:
                items[i].sample = items[i].encoded.cpu_sample()
                items[i].route = REJECTED
                continue
            by_size.setdefault(tuple(image.shape[1:]), []).append((i, image))
        # images of one original size are resized together: a split has few sizes
        for original, group in by_size.items():
            rows = [i for i, _ in group]
            resized = resize_like_pil(torch.stack([image for _, image in group]), self.size)
            inputs[rows] = resized.permute(0, 2, 3, 1)
            orig_size[rows] = torch.tensor(original, dtype=torch.int32)
            valid[rows] = True
        on_cpu = [i for i, item in enumerate(items) if item.sample is not None]
        if on_cpu:
            pixels = np.stack([items[i].sample["input"].numpy() for i in on_cpu])
            inputs[on_cpu] = torch.from_numpy(pixels).to(self.device)
            for i in on_cpu:
                sample = items[i].sample
                orig_size[i] = sample["orig_size"]
                valid[i] = bool(sample["valid"])
                errors[i] = sample["error"]
        for item in items:
            if item.sample is None:
                self.counts.device += 1
            else:
                self.counts.cpu[item.route] += 1
            item.data = item.encoded = None  # the bytes are no longer needed
        return {
            "image_id": torch.tensor([item.image_id for item in items], dtype=torch.int64),
            "input": inputs,
            "orig_size": orig_size,
            "valid": valid,
            "error": errors,
            "row": torch.tensor([item.row for item in items], dtype=torch.int64),
        }

    def _decode(self, items: list[Prepared]) -> list[torch.Tensor | None]:
        """Each item decoded on the device, None where the device decoder rejects it."""
        if not items:
            return []
        try:
            images = list(self.batch_decoder([item.data for item in items], self.device))
            if len(images) != len(items):
                raise ValueError(f"{len(images)} images decoded from {len(items)} files")
        except (RuntimeError, ValueError) as exc:
            # the decoder returns nothing when one image fails: find which, one at a time
            log.debug(f"batch of {len(items)} rejected by the device decoder ({_first_line(exc)}); one by one")
            images = [self._decode_one(item) for item in items]
        return [image if image is not None and _as_announced(image, item) else None
                for image, item in zip(images, items, strict=True)]

    def _decode_one(self, item: Prepared) -> torch.Tensor | None:
        try:
            images = self.batch_decoder([item.data], self.device)
            if len(images) != 1:
                raise ValueError(f"{len(images)} images decoded from one file")
            return images[0]
        except (RuntimeError, ValueError) as exc:
            log.debug(f"image {item.image_id} rejected by the device decoder: {_first_line(exc)}")
            return None


def _as_announced(image: torch.Tensor, item: Prepared) -> bool:
    """A decoded image is used only if it is RGB at the size its header gives (anything else: CPU path)."""
    return image.dim() == 3 and image.shape[0] == 3 and tuple(image.shape[1:]) == item.header_size


def _pil_pixel_limit() -> int | None:
    """The image size past which the CPU path (PIL) refuses to decode: twice ``MAX_IMAGE_PIXELS``."""
    from PIL import Image

    return None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
