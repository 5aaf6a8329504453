"""The cache schema (SPEC §3), defined here and nowhere else.

A cache is one zarr v3 group. Each tap is an array at ``tap_path(tap)``: (N, T, C) float16,
or (N, H, W, 3) uint8 for ``input``; one image per chunk, ``shard_size`` images per shard,
Blosc zstd (byte-shuffled, one block per chunk) and a crc32c checksum on every chunk, except that
the taps a lossless cache's codec record lists as ``uncompressed`` are stored without a compressor
(the crc32c kept): Blosc saves too little on them to be worth its decode time; and ``input`` is
stored with lossless JPEG XL (:mod:`invcache.cache.image_codec`) and its crc32c, in every cache.
Beside the taps:

- ``image_id`` (N,) int64, ascending COCO ids;
- ``orig_size`` (N, 2) int32, (H, W) before resizing;
- ``valid`` (N,) bool, False where the image could not be read (its rows stay zeros);
- ``failure`` (N,) str, the reason an image is invalid ("" otherwise);
- ``shard_digest`` (num_shards, num_taps) uint32, the digest of each tap's shard file (the crc32c of
  its chunks' crc32c checksums and its index; taps in the order of the root ``taps`` attribute),
  recorded as the shard completes: it binds each file to its shard, so a file moved, swapped or
  replaced by another valid shard file is named as damage;
- ``shard_complete`` (num_shards,) bool, set only after every array of a shard is written (a
  missing flag reads as False, except in a cache whose root attribute ``complete`` is true);
- ``mean_image`` (H, W, 3) float64 in [0, 1], the mean valid ``input``, written once extraction finishes.

The per-image arrays are chunked by shard (and the per-shard ones one shard per chunk), so the
writer of a shard owns every chunk it touches. Every bookkeeping chunk of a complete shard is
stored, even one equal to the fill value, so a missing chunk is damage rather than "all False".
Every array carries ``dimension_names`` and a ``description`` attribute (taps also name their
``tap``), so plain zarr and xarray users see what they read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase

import numpy as np
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

from invcache.cache.image_codec import JpegXlCodec
from invcache.taps import BACKBONE_C5, HEAD_BOXES, HEAD_LOGITS, INPUT, layer_index, tap_path

# 2: shard_digest; bookkeeping chunks stored even when equal to the fill value.
SCHEMA_VERSION = 2
BLOSC_CNAME = "zstd"
BLOSC_CLEVEL = 1
# Shuffled by bytes (2-byte fp16 elements: the high bytes, sign and exponent, apart from the low mantissa
# bytes) and one Blosc block per chunk up to 1 MiB, so zstd sees a whole row at once. Measured on every tap
# of DETR-R50 at 480x640 (benchmarks/codecs.py): activations 1.18 MB an image against 1.23 with bit-shuffle
# and Blosc's own block size, decoding 1.2-2.0 GB/s a core instead of 0.6-1.4; with --keepbits the same
# as bit-shuffle to 1% (the rounded-off mantissa bits are in the low bytes).
BLOSC_SHUFFLE = "shuffle"
BLOSC_BLOCKSIZE = 1 << 20
FLOAT_DTYPE = np.float16
# A tap Blosc shrinks by less than this is stored without a compressor in a lossless cache (SPEC §3, "about
# 1.1x"): the bytes saved do not pay for the decoding (1.2-2 GB/s a core, where reading a raw row is a copy).
# Extraction measures each tap on its first batch (invcache.cache.codec_choice). On DETR-R50 at 480x640 the
# encoder outputs, LayerNorm'd fp16 values, compress 1.100-1.104x (1.04-1.08 with bit-shuffle), the decoder
# outputs 1.56-1.63x, the class logits 1.67x, head.boxes 4x: with the bound at 1.08 they are all compressed,
# and the activations take 1.18 MB an image (SPEC §8: at most 1.2) rather than 1.28 with the encoder raw.
# Rows of a few KB (the embedded default) do not compress and are stored raw. With --keepbits the rounded
# mantissas compress, and every tap keeps Blosc. Caches created without data (Cache.create alone) store
# UNCOMPRESSED raw: what earlier versions measured, kept as the default of that API.
COMPRESSION_WORTHWHILE = 1.08
UNCOMPRESSED = ("enc.*",)
# The patterns records of earlier caches may hold under "uncompressed" (every version's default).
_UNCOMPRESSED_PATTERNS = ("enc.*", "dec.*")
# input, in lossless and --keepbits caches alike (it is what DETR saw, kept bit for bit): lossless JPEG XL
# stores a 480x640 photograph in 2.4-2.9x less space where Blosc zstd gets 1.4x (benchmarks/image_codecs.py).
INPUT_CODEC = JpegXlCodec()

IMAGE_ID = "image_id"
ORIG_SIZE = "orig_size"
VALID = "valid"
FAILURE = "failure"
SHARD_COMPLETE = "shard_complete"
SHARD_DIGEST = "shard_digest"
MEAN_IMAGE = "mean_image"
PER_IMAGE_ARRAYS = (IMAGE_ID, ORIG_SIZE, VALID, FAILURE)
PER_SHARD_ARRAYS = (SHARD_COMPLETE, SHARD_DIGEST)
BOOKKEEPING_ARRAYS = (*PER_IMAGE_ARRAYS, *PER_SHARD_ARRAYS, MEAN_IMAGE)

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
    SHARD_DIGEST: (("shard", "tap"), "digest of each tap's shard file: crc32c of its chunks' crc32c and its index "
                                     "(taps in the order of the root attribute taps), recorded as the shard completes"),
    MEAN_IMAGE: (MEAN_IMAGE_DIMENSIONS, "mean of the valid input images, RGB in [0, 1]"),
}

def tap_dtype(tap: str) -> np.dtype:
    return np.dtype(np.uint8) if tap == INPUT else np.dtype(FLOAT_DTYPE)


def num_shards(num_images: int, shard_size: int) -> int:
    return max(1, math.ceil(num_images / shard_size))


def codec_record(keepbits: int | None, uncompressed: Sequence[str] | None = None) -> dict:
    """The root ``codec`` attribute: Blosc's settings, the checksum, ``keepbits``, the taps (or tap patterns)
    stored without a compressor (``uncompressed``: as measured, else :data:`UNCOMPRESSED`; none with
    ``keepbits``) and the codec of ``input`` (``input``, as zarr metadata)."""
    if keepbits is not None and uncompressed:
        raise ValueError(f"a cache with keepbits {keepbits} compresses every tap; uncompressed {uncompressed} given")
    if uncompressed is not None and not _is_uncompressed_list(list(uncompressed)):
        raise ValueError(f"uncompressed {uncompressed!r} is not a list of distinct float taps")
    if keepbits is not None:
        uncompressed = []
    return {
        "name": "blosc", "cname": BLOSC_CNAME, "clevel": BLOSC_CLEVEL, "shuffle": BLOSC_SHUFFLE,
        "blocksize": BLOSC_BLOCKSIZE, "checksum": "crc32c", "keepbits": keepbits,
        "uncompressed": list(UNCOMPRESSED if uncompressed is None else uncompressed), "input": INPUT_CODEC.to_dict(),
    }


def blosc() -> Blosc:
    """The cache's Blosc as numcodecs', for measuring what it achieves (the element size is the rows' itemsize)."""
    return Blosc(cname=BLOSC_CNAME, clevel=BLOSC_CLEVEL, shuffle=Blosc.SHUFFLE, blocksize=BLOSC_BLOCKSIZE)


# The keys codec_record gained after the first caches, newest first: a cache made before a key existed has a
# record without it and every later one (without "blocksize": Blosc bit-shuffled, in blocks of its choosing;
# without "input": input with Blosc; without "uncompressed": every tap with Blosc).
_LATER_CODEC_KEYS = ("blocksize", "input", "uncompressed")
_BEFORE_BLOCKSIZE = {"shuffle": "bitshuffle"}


def is_codec_record(codec: object) -> bool:
    """Whether ``codec`` is a record :func:`codec_record` writes, or the one of caches made before
    ``input`` or ``uncompressed`` existed."""
    if not isinstance(codec, dict):
        return False
    keepbits, uncompressed = codec.get("keepbits"), codec.get("uncompressed", [])
    if not (keepbits is None or (_is_positive_int(keepbits) and keepbits <= 10)):
        return False
    if not _is_uncompressed_list(uncompressed) or (keepbits is not None and uncompressed):
        return False
    record = codec_record(keepbits, uncompressed)
    for key in (None, *_LATER_CODEC_KEYS):
        record = {k: v for k, v in record.items() if k != key}
        if key == "blocksize":
            record.update(_BEFORE_BLOCKSIZE)
        if _canonical(codec) == _canonical(record):  # not ==, for which 1.0 and True are the integer 1
            return True
    return False


def _canonical(record: dict) -> str:
    return json.dumps(record, sort_keys=True)


def _is_uncompressed_list(value: object) -> bool:
    """Distinct float taps, or the :data:`UNCOMPRESSED` patterns (what codec records hold under ``uncompressed``)."""
    if not isinstance(value, list) or len(set(map(str, value))) != len(value):
        return False
    names = (HEAD_LOGITS, HEAD_BOXES, BACKBONE_C5, *_UNCOMPRESSED_PATTERNS)
    return all(isinstance(t, str) and (t in names or (layer_index(t) is not None and len(t) < 12)) for t in value)


def stored_as_image(tap: str, codec: Mapping) -> bool:
    """Whether a cache with the ``codec`` record stores ``tap`` with the image codec (``input``, since it existed)."""
    return tap == INPUT and "input" in codec


def compressed(tap: str, codec: Mapping) -> bool:
    """Whether a cache with the ``codec`` record stores ``tap`` with Blosc."""
    return not stored_as_image(tap, codec) and not any(
        fnmatchcase(tap, pattern) for pattern in codec.get("uncompressed", []))


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


def tap_codecs(tap: str, codec: Mapping) -> dict:
    """``create_array`` keyword arguments for a tap's filters, serializer and compressors in a cache whose
    record is ``codec``."""
    if stored_as_image(tap, codec):
        return {"filters": [], "serializer": INPUT_CODEC, "compressors": [Crc32cCodec()]}
    compressors = [Crc32cCodec()]
    keepbits = codec["keepbits"]
    if compressed(tap, codec):
        compressors.insert(0, BloscCodec(cname=BLOSC_CNAME, clevel=BLOSC_CLEVEL, shuffle=BloscShuffle(BLOSC_SHUFFLE),
                                         blocksize=BLOSC_BLOCKSIZE))
    filters = []
    if keepbits is not None and tap != INPUT:
        from zarr.codecs.numcodecs import BitRound

        filters = [BitRound(keepbits=keepbits)]
    return {"filters": filters, "compressors": compressors}


def bookkeeping_array_specs(num_images: int, shard_size: int, num_taps: int) -> dict[str, dict]:
    """Shape, dtype, chunking and codecs (zstd, then a crc32c on every chunk) of the bookkeeping arrays.

    The per-image arrays hold one shard per chunk, the per-shard arrays one shard per chunk too, so
    chunk ``s`` of any of them belongs to shard ``s``.
    """
    chunk = min(shard_size, max(num_images, 1))
    shards = num_shards(num_images, shard_size)
    specs = {
        IMAGE_ID: {"shape": (num_images,), "dtype": np.int64, "chunks": (chunk,)},
        ORIG_SIZE: {"shape": (num_images, 2), "dtype": np.int32, "chunks": (chunk, 2)},
        VALID: {"shape": (num_images,), "dtype": bool, "chunks": (chunk,)},
        FAILURE: {"shape": (num_images,), "dtype": str, "chunks": (chunk,)},
        SHARD_COMPLETE: {"shape": (shards,), "dtype": bool, "chunks": (1,)},
        SHARD_DIGEST: {"shape": (shards, num_taps), "dtype": np.uint32, "chunks": (1, num_taps)},
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


# uint8 rows summed in uint16 blocks of this many never overflow (255 * 257 = 65535), and a uint16 sum runs
# about 5x faster than a uint64 one; the blocks' sums add up in uint64.
_UINT16_SUM_ROWS = 257


def sum_images(images: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The exact uint64 sum over the ``valid`` rows of uint8 ``images`` (what the mean image averages)."""
    rows = images if valid.all() else images[valid]
    total = np.zeros(images.shape[1:], np.uint64)
    for start in range(0, len(rows), _UINT16_SUM_ROWS):
        total += rows[start:start + _UINT16_SUM_ROWS].sum(axis=0, dtype=np.uint16)
    return total


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


# -- what a reader checks of a cache's metadata ---------------------------------------------------
# Each check returns phrases ("shard_size is 0, not a positive integer"); the store prefixes the file.

# The keys of ``model.config``: DetrConfig's fields, from which training and the analyses rebuild the model
# (a test keeps the two lists equal; importing the model here would import torch into every reader).
MODEL_CONFIG_KEYS = ("name", "backbone", "dilation", "d_model", "nhead", "num_encoder_layers", "num_decoder_layers",
                     "dim_feedforward", "num_queries", "num_classes")
STATES = ("creating", "ready")


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_number_triple(value: object) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


_POSITIVE_INT = (_is_positive_int, "a positive integer")
_TEXT = (lambda v: isinstance(v, str) and v != "", "a non-empty string")
_FLAG = (lambda v: isinstance(v, bool), "true or false")
_RECORD = (lambda v: isinstance(v, dict), "a record")
_MODEL_FIELDS = {"model": _TEXT, "config": _RECORD, "weights_sha256": _TEXT}
_MODEL_CONFIG_FIELDS = {
    "name": _TEXT, "backbone": _TEXT, "dilation": _FLAG, "d_model": _POSITIVE_INT, "nhead": _POSITIVE_INT,
    "num_encoder_layers": _POSITIVE_INT, "num_decoder_layers": _POSITIVE_INT, "dim_feedforward": _POSITIVE_INT,
    "num_queries": _POSITIVE_INT, "num_classes": _POSITIVE_INT,
}
_PREPROCESSING_FIELDS = {
    "size": (lambda v: isinstance(v, list) and len(v) == 2 and all(_is_positive_int(x) for x in v),
             "[height, width] in pixels"),
    "mean": (_is_number_triple, "three numbers"),
    "std": (_is_number_triple, "three numbers"),
}


def is_tap_name(name: object) -> bool:
    """Whether ``name`` is a storable tap of some DETR (SPEC §1); ``dec.0`` is never stored."""
    if name in (INPUT, BACKBONE_C5, HEAD_LOGITS, HEAD_BOXES):
        return True
    k = layer_index(name) if isinstance(name, str) else None
    return k is not None and name in (f"enc.{k}", f"dec.{k}") and (k >= 1 or name.startswith("enc."))


def layout_problems(attrs: Mapping) -> list[str]:
    """What is wrong with the root attributes every reader relies on: schema_version, taps, shard_size,
    num_images, codec and state (as Cache.create and extraction write them)."""
    def found(key: str) -> str:
        return f"{key} is {attrs[key]!r}" if key in attrs else f"{key} is missing"

    problems = []
    version = attrs.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        problems.append(f"{found('schema_version')}, but this invcache reads schema {SCHEMA_VERSION}: extract the "
                        "cache again (--overwrite)")
    taps = attrs.get("taps")
    if not isinstance(taps, list) or not taps:
        problems.append(f"{found('taps')}, not a list of tap names")
    else:
        unknown = [t for t in taps if not is_tap_name(t)]
        if unknown:
            problems.append(f"taps lists {', '.join(repr(t) for t in unknown)}, not tap names")
        elif len(set(taps)) != len(taps):
            problems.append(f"taps lists a tap twice: {taps}")
    for key in ("shard_size", "num_images"):
        if not _is_positive_int(attrs.get(key)):
            problems.append(f"{found(key)}, not a positive integer")
    if not is_codec_record(attrs.get("codec")):
        problems.append(f"{found('codec')}, not a record of the cache's codec")
    if "state" in attrs and attrs["state"] not in STATES:
        problems.append(f"state is {attrs['state']!r}, not one of {', '.join(STATES)}")
    return problems


def provenance_problems(attrs: Mapping) -> list[str]:
    """What is wrong with ``model`` and ``preprocessing``, the provenance training and the analyses rely on.

    A cache made by ``invcache extract`` (it has a ``state``) always records both; a cache made through
    the API may leave them out, but what it records must be whole.
    """
    problems = []
    for key, fields in (("model", _MODEL_FIELDS), ("preprocessing", _PREPROCESSING_FIELDS)):
        if key in attrs:
            problems += _record_problems(attrs[key], key, fields)
        elif "state" in attrs:
            problems.append(f"{key} is missing (invcache extract records it in every cache)")
    model = attrs.get("model")
    if isinstance(model, dict) and isinstance(model.get("config"), dict):
        problems += _record_problems(model["config"], "model.config", _MODEL_CONFIG_FIELDS, exact=True)
    return problems


def _record_problems(record: object, name: str, fields: Mapping[str, tuple], exact: bool = False) -> list[str]:
    if not isinstance(record, dict):
        return [f"{name} is {record!r}, not a record"]
    problems = []
    for key, (valid, meaning) in fields.items():
        if key not in record:
            problems.append(f"{name}.{key} is missing")
        elif not valid(record[key]):
            problems.append(f"{name}.{key} is {record[key]!r}, not {meaning}")
    if exact:
        problems += [f"{name} has an unknown key {key!r}" for key in record if key not in fields]
    return problems


def provenance_row_shape(tap: str, config: Mapping, size: Sequence[int]) -> tuple[int | None, ...] | None:
    """The per-image shape SPEC §1 gives ``tap`` for a DETR with ``config`` fed images of ``size``.

    None when that DETR has no such tap; ``backbone.c5``'s channel count (the ResNet's) is None,
    unchecked. The feature map is the image downsampled by the backbone's stride, rounding up.
    """
    stride = 16 if config["dilation"] else 32
    tokens = math.ceil(size[0] / stride) * math.ceil(size[1] / stride)
    queries, d_model = config["num_queries"], config["d_model"]
    k = layer_index(tap)
    fixed = {INPUT: (size[0], size[1], 3), BACKBONE_C5: (tokens, None),
             HEAD_LOGITS: (queries, config["num_classes"] + 1), HEAD_BOXES: (queries, 4)}
    if tap in fixed:
        return fixed[tap]
    if tap.startswith("enc.") and k is not None and k <= config["num_encoder_layers"]:
        return (tokens, d_model)
    if tap.startswith("dec.") and k is not None and k <= config["num_decoder_layers"]:
        return (queries, d_model)
    return None


def array_problems(name: str, array: zarr.Array, attrs: Mapping) -> list[str]:
    """Where a tap's or a per-image or per-shard bookkeeping array's shape, chunks, shards or dtype
    disagree with the root attributes (which must pass :func:`layout_problems`)."""
    num_images, shard_size, taps = attrs["num_images"], attrs["shard_size"], attrs["taps"]
    problems = []
    if name in taps:
        ndim = len(INPUT_DIMENSIONS if name == INPUT else TAP_DIMENSIONS)
        if array.ndim != ndim or array.shape[0] != num_images:
            problems.append(f"shape {array.shape}, not {num_images} images (num_images) of {ndim - 1}-dimensional "
                            "rows")
        if array.shards is None or array.shards[0] != shard_size or array.chunks[0] != 1:
            problems.append(f"shards of {array.shards[0] if array.shards else None} images, chunks of "
                            f"{array.chunks[0]}, but shard_size is {shard_size}, one image per chunk")
        if array.dtype != tap_dtype(name):
            problems.append(f"dtype {array.dtype}, not {tap_dtype(name)}")
        return problems
    spec = bookkeeping_array_specs(num_images, shard_size, len(taps))[name]
    if tuple(array.shape) != spec["shape"] or tuple(array.chunks) != spec["chunks"]:
        problems.append(f"shape {array.shape} in chunks of {array.chunks}, but num_images {num_images}, shard_size "
                        f"{shard_size} and {len(taps)} taps make it {spec['shape']} in chunks of {spec['chunks']}")
    if not _dtype_matches(array.dtype, spec["dtype"]):
        problems.append(f"dtype {array.dtype}, not {np.dtype(spec['dtype'])}")
    return problems


def mean_image_problems(array: zarr.Array, row_shape: tuple[int, ...]) -> list[str]:
    """Where ``mean_image`` disagrees with the ``input`` rows it averages (``row_shape``)."""
    spec = mean_image_spec(row_shape)
    if tuple(array.shape) != spec["shape"] or tuple(array.chunks) != spec["chunks"] or array.dtype != spec["dtype"]:
        return [f"shape {array.shape} {array.dtype} in chunks of {array.chunks}, not one {spec['shape']} float64 "
                "chunk, the shape of an input row"]
    return []


def _dtype_matches(actual: np.dtype, expected: object) -> bool:
    if expected is str:  # zarr reads variable-length strings as numpy's StringDType (or object, or unicode)
        return actual.kind in "TUO"
    return actual == np.dtype(expected)
