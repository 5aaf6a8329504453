"""The lossless image codec of the ``input`` tap: JPEG XL, lossless, as a zarr v3 array-to-bytes codec.

Measured on photographs at 480×640 (benchmarks/image_codecs.py; docs/performance.md, "The input
tap's codec"): JPEG XL lossless at effort 1 stores an image in 2.4–2.9× less space, against 1.4× for
Blosc zstd, and encodes in about 1.6 CPU-ms, where PNG and WebP lossless take 14–27 ms for a smaller
or equal gain; its decode (about 7 ms an image on one core) is the price.

The codec's name and configuration follow zarr-python's convention for numcodecs codecs
(``numcodecs.<codec id>``, configured as ``imagecodecs.numcodecs.Jpegxl`` is): the package registers
it with zarr through the ``zarr.codecs`` entry point, so plain ``zarr.open_group`` reads a cache
wherever invcache is installed, without importing it. Only lossless configurations are accepted:
``input`` is what DETR saw, bit for bit.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import imagecodecs
import numpy as np
from zarr.abc.codec import ArrayBytesCodec

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

JPEGXL_NAME = "numcodecs.imagecodecs_jpegxl"
# Effort 1 (of 1-9): 2.4-2.9x on photographs at 1.6 CPU-ms an image; effort 2 gains 6% for 9x the time.
JPEGXL_EFFORT = 1


@dataclass(frozen=True)
class JpegXlCodec(ArrayBytesCodec):
    """Lossless JPEG XL of one (…, H, W, 3) uint8 image per chunk (leading axes of length 1)."""

    is_fixed_size = False

    effort: int

    def __init__(self, *, lossless: bool = True, effort: int = JPEGXL_EFFORT) -> None:
        if lossless is not True:
            raise ValueError(f"{JPEGXL_NAME}: only lossless JPEG XL is accepted (lossless is {lossless!r})")
        if not (isinstance(effort, int) and not isinstance(effort, bool) and 1 <= effort <= 9):
            raise ValueError(f"{JPEGXL_NAME}: effort must be an integer from 1 to 9, not {effort!r}")
        object.__setattr__(self, "effort", effort)

    @classmethod
    def from_dict(cls, data: dict) -> Self:
        if data.get("name") != JPEGXL_NAME:
            raise ValueError(f"expected the codec {JPEGXL_NAME}, not {data.get('name')!r}")
        configuration = data.get("configuration", {})
        if not isinstance(configuration, dict) or set(configuration) - {"lossless", "effort"}:
            raise ValueError(f"{JPEGXL_NAME}: configuration {configuration!r} is not lossless and effort")
        return cls(**configuration)

    def to_dict(self) -> dict:
        return {"name": JPEGXL_NAME, "configuration": {"lossless": True, "effort": self.effort}}

    def encode_image(self, image: np.ndarray) -> bytes:
        """The chunk bytes of one image; ``numthreads=1`` because writers already run one image per thread."""
        if image.dtype != np.uint8 or image.ndim < 3 or image.shape[-1] != 3 or any(n != 1 for n in image.shape[:-3]):
            raise ValueError(f"{JPEGXL_NAME} stores one RGB uint8 image per chunk, not {image.dtype} {image.shape}")
        return bytes(imagecodecs.jpegxl_encode(image.reshape(image.shape[-3:]), lossless=True, effort=self.effort,
                                               numthreads=1))

    @staticmethod
    def decode_image(data: bytes | np.ndarray, out: np.ndarray) -> np.ndarray:
        """Decode one chunk into ``out``, a uint8 (H, W, 3) array; raises ValueError if the chunk is not a JPEG XL
        image of exactly that shape. The header is checked before any pixel is decoded, so a small chunk that
        claims a huge image costs nothing."""
        try:
            return imagecodecs.jpegxl_decode(data, numthreads=1, out=out)
        except (RuntimeError, ValueError) as exc:  # imagecodecs' JpegxlError is a RuntimeError; a shape, ValueError
            raise ValueError(f"JPEG XL decoding failed: {exc}") from None

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        shape = chunk_spec.shape
        if len(shape) < 3 or shape[-1] != 3 or any(n != 1 for n in shape[:-3]):
            raise ValueError(f"JPEG XL decoding failed: the array's chunks {shape} are not one RGB image")
        image = np.empty(shape[-3:], np.uint8)
        await asyncio.to_thread(self.decode_image, chunk_bytes.to_bytes(), image)
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(image.reshape(shape))

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        data = await asyncio.to_thread(self.encode_image, chunk_array.as_ndarray_like())
        return chunk_spec.prototype.buffer.from_bytes(data)

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError(f"{JPEGXL_NAME} has no fixed encoded size")
