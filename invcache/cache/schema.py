"""The cache schema (SPEC §3), defined here and nowhere else.

A cache is one zarr v3 group. Each tap is an array at ``tap_path(tap)``: (N, T, C) float16,
or (N, H, W, 3) uint8 for ``input``; one image per chunk, ``shard_size`` images per shard,
Blosc zstd with bit-shuffle and a crc32c checksum on every chunk. Beside the taps:

- ``image_id`` (N,) int64, ascending COCO ids;
- ``orig_size`` (N, 2) int32, (H, W) before resizing;
- ``valid`` (N,) bool, False where the image could not be read (its rows stay zeros);
- ``failure`` (N,) str, the reason an image is invalid ("" otherwise);
- ``shard_complete`` (num_shards,) bool, set only after every array of a shard is written;
- ``mean_image`` (H, W, 3) float64 in [0, 1], the mean valid ``input``, written once extraction finishes.

The per-image arrays are chunked by shard, so the writer of a shard owns every chunk it touches.
Every array carries ``dimension_names`` and a ``description`` attribute (taps also name their
``tap``), so plain zarr and xarray users see what they read.
"""

from __future__ import annotations

import math

import numpy as np
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

from invcache.taps import BACKBONE_C5, HEAD_BOXES, HEAD_LOGITS, INPUT, layer_index, tap_path

SCHEMA_VERSION = 1
BLOSC_CNAME = "zstd"
BLOSC_CLEVEL = 1
FLOAT_DTYPE = np.float16

IMAGE_ID = "image_id"
ORIG_SIZE = "orig_size"
VALID = "valid"
FAILURE = "failure"
SHARD_COMPLETE = "shard_complete"
MEAN_IMAGE = "mean_image"
PER_IMAGE_ARRAYS = (IMAGE_ID, ORIG_SIZE, VALID, FAILURE)
BOOKKEEPING_ARRAYS = (*PER_IMAGE_ARRAYS, SHARD_COMPLETE, MEAN_IMAGE)

TAP_DIMENSIONS = ("image", "token", "channel")
INPUT_DIMENSIONS = ("image", "y", "x", "rgb")
MEAN_IMAGE_DIMENSIONS = ("y", "x", "rgb")
# The attribute of ``mean_image`` that holds how many images it averages (written last).
MEAN_IMAGE_COUNT = "count"

_BOOKKEEPING = {  # name -> (dimension names, description)
    IMAGE_ID: (("image",), "COCO image id, ascending"),
    ORIG_SIZE: (("image", "hw"), "original (height, width) of the image before resizing"),
    VALID: (("image",), "False where the image could not be read (its rows are zeros)"),
    FAILURE: (("image",), "why the image is invalid (empty if valid)"),
    SHARD_COMPLETE: (("shard",), "True once every array of the shard is written"),
    MEAN_IMAGE: (MEAN_IMAGE_DIMENSIONS, "mean of the valid input images, RGB in [0, 1]"),
}

def tap_dtype(tap: str) -> np.dtype:
    return np.dtype(np.uint8) if tap == INPUT else np.dtype(FLOAT_DTYPE)


def num_shards(num_images: int, shard_size: int) -> int:
    return max(1, math.ceil(num_images / shard_size))


def codec_record(keepbits: int | None) -> dict:
    return {
        "name": "blosc", "cname": BLOSC_CNAME, "clevel": BLOSC_CLEVEL, "shuffle": "bitshuffle",
        "checksum": "crc32c", "keepbits": keepbits,
    }


def tap_description(tap: str) -> str:
    """What a tap holds, in SPEC §1's words."""
    fixed = {
        INPUT: "the resized RGB image fed to DETR, before normalization",
        BACKBONE_C5: "ResNet layer4 output, token-major (row-major h, w)",
        HEAD_LOGITS: "class logits per query, including the no-object class (last)",
        HEAD_BOXES: "boxes per query (cx, cy, w, h), sigmoid applied, normalized to the resized image",
    }
    k = layer_index(tap)
    if tap in fixed:
        return fixed[tap]
    if k is None:
        raise ValueError(f"{tap!r} is not a tap")
    if tap.startswith("dec."):
        return f"output of decoder layer {k}, after the decoder's final LayerNorm"
    if k == 0:
        return "backbone embedding input_proj(c5), token-major (row-major h, w): the encoder input"
    return f"output of encoder layer {k}"


def tap_labels(tap: str) -> dict:
    """``create_array`` keyword arguments naming a tap array's dimensions and content."""
    return {
        "dimension_names": INPUT_DIMENSIONS if tap == INPUT else TAP_DIMENSIONS,
        "attributes": {"tap": tap, "description": tap_description(tap)},
    }


def bookkeeping_labels(name: str) -> dict:
    """``create_array`` keyword arguments naming a bookkeeping array's dimensions and content."""
    dims, description = _BOOKKEEPING[name]
    return {"dimension_names": dims, "attributes": {"description": description}}


def tap_codecs(tap: str, keepbits: int | None) -> dict:
    """``create_array`` keyword arguments for a tap's filters and compressors."""
    compressors = [BloscCodec(cname=BLOSC_CNAME, clevel=BLOSC_CLEVEL, shuffle=BloscShuffle.bitshuffle), Crc32cCodec()]
    filters = []
    if keepbits is not None and tap != INPUT:
        from zarr.codecs.numcodecs import BitRound

        filters = [BitRound(keepbits=keepbits)]
    return {"filters": filters, "compressors": compressors}


def per_image_array_specs(num_images: int, shard_size: int) -> dict[str, dict]:
    """Shape, dtype, chunking and codecs (zstd, then a crc32c on every chunk) of the bookkeeping arrays."""
    chunk = min(shard_size, max(num_images, 1))
    specs = {
        IMAGE_ID: {"shape": (num_images,), "dtype": np.int64, "chunks": (chunk,)},
        ORIG_SIZE: {"shape": (num_images, 2), "dtype": np.int32, "chunks": (chunk, 2)},
        VALID: {"shape": (num_images,), "dtype": bool, "chunks": (chunk,)},
        FAILURE: {"shape": (num_images,), "dtype": str, "chunks": (chunk,)},
        SHARD_COMPLETE: {"shape": (num_shards(num_images, shard_size),), "dtype": bool, "chunks": (1,)},
    }
    for name, spec in specs.items():
        spec["compressors"] = [ZstdCodec(level=1), Crc32cCodec()]
        spec.update(bookkeeping_labels(name))
    return specs


def mean_image_spec(row_shape: tuple[int, ...]) -> dict:
    """``create_array`` keyword arguments of ``mean_image``: one chunk, zstd and a crc32c.

    Its ``count`` attribute is written after the data, so a write cut short lacks it.
    """
    return {"shape": row_shape, "dtype": np.float64, "chunks": row_shape,
            "compressors": [ZstdCodec(level=1), Crc32cCodec()], **bookkeeping_labels(MEAN_IMAGE)}


def empty_bookkeeping(rows: int) -> dict[str, np.ndarray]:
    """Zeroed per-image bookkeeping rows for one shard (all invalid, no reason) for a writer to fill."""
    return {
        IMAGE_ID: np.zeros(rows, np.int64),
        ORIG_SIZE: np.zeros((rows, 2), np.int32),
        VALID: np.zeros(rows, bool),
        FAILURE: np.full(rows, "", dtype=object),
    }


def array_path(name: str) -> str:
    """The path of a tap or bookkeeping array inside the group."""
    return name if name in BOOKKEEPING_ARRAYS else tap_path(name)
