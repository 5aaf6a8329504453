"""Open, create, write and read caches: whole shards in, shard-sized blocks out."""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Executor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr
from zarr.core.sync import sync

from invcache.cache import schema as S
from invcache.cache.shard_codec import ChecksumError, ShardCodec
from invcache.cache.view import TapView
from invcache.errors import InvcacheError, UsageError
from invcache.settings import DEFAULT_SHARD_SIZE
from invcache.taps import DECODER_INPUT, INPUT

if TYPE_CHECKING:
    from invcache.cache.reader import CacheSamples


class CacheCorruptError(InvcacheError):
    """A chunk whose checksum (or encoding) does not verify; the message names array and shard."""


# What damaged bytes raise, as (type, message prefix). zarr's crc32c codec and numcodecs' Blosc and
# Zstd raise plain ValueError / RuntimeError, so only the message tells damage from a programming
# error (a bad argument), which must surface as itself rather than as "does not verify".
CORRUPTION_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (ChecksumError, ""),  # invcache's shard decoder: crc32c mismatch, truncated shard, missing image or file
    (ValueError, "Stored and computed checksum do not match"),  # zarr.codecs.crc32c_: any chunk or shard index
    (RuntimeError, "error during blosc decompression"),  # numcodecs.blosc
    (RuntimeError, "Zstd decompression error"),  # numcodecs.zstd (bookkeeping arrays)
)
_CORRUPTION_TYPES = tuple(kind for kind, _ in CORRUPTION_ERRORS)


def is_corruption(exc: BaseException) -> bool:
    """Whether ``exc`` is one of :data:`CORRUPTION_ERRORS`: what damaged bytes raise."""
    return any(isinstance(exc, kind) and str(exc).startswith(prefix) for kind, prefix in CORRUPTION_ERRORS)


_NUMCODECS_WARNING = "Numcodecs codecs are not in the Zarr version 3 specification"
# catch_warnings swaps process-wide state: concurrent opens (verify's threads) would restore each
# other's filters, and could leave the "ignore" installed for good.
_WARNINGS_LOCK = threading.Lock()


@contextmanager
def _numcodecs_quiet() -> Iterator[None]:
    """Silence zarr's warning that ``--keepbits``' BitRound filter is outside the v3 specification.

    zarr warns each time it builds that codec: when an array using it is created or opened. The
    cache records its codec, so the warning adds nothing; it is silenced here and nowhere else.
    """
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NUMCODECS_WARNING)
        yield


class Cache:
    """A cache on disk (or any store zarr opens). Create with :meth:`create`, open with :meth:`open`.

    ``len(cache)`` is its number of images; ``cache["enc.3"]`` is a lazy :class:`TapView` of a tap.
    """

    def __init__(self, group: zarr.Group, location: str) -> None:
        self.group = group
        self.location = location
        self._codecs: dict[str, ShardCodec] = {}
        self._arrays: dict[str, zarr.Array] = {}

    # -- creation and opening -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        location: str | os.PathLike,
        *,
        num_images: int,
        tap_shapes: Mapping[str, tuple[int, ...]],
        shard_size: int = DEFAULT_SHARD_SIZE,
        keepbits: int | None = None,
        attributes: Mapping | None = None,
    ) -> Cache:
        """Create every array of an empty cache (replacing anything at ``location``).

        The attributes are written before any array, so a creation cut short still reads as
        a cache (in whatever ``state`` the caller gave) rather than as a foreign group.
        """
        location = os.fspath(location)
        group = zarr.open_group(location, mode="w", zarr_format=3)
        group.attrs.update({
            **(attributes or {}),
            "schema_version": S.SCHEMA_VERSION,
            "taps": list(tap_shapes),
            "shard_size": shard_size,
            "num_images": num_images,
            "codec": S.codec_record(keepbits),
        })
        for name, spec in S.per_image_array_specs(num_images, shard_size).items():
            group.create_array(name, fill_value=_fill(spec["dtype"]), **spec)
        for tap, shape in tap_shapes.items():
            with _numcodecs_quiet():
                group.create_array(
                    S.array_path(tap), shape=(num_images, *shape), dtype=S.tap_dtype(tap), chunks=(1, *shape),
                    shards=(shard_size, *shape), fill_value=0, **S.tap_codecs(tap, keepbits), **S.tap_labels(tap),
                )
        return cls(group, location)

    @classmethod
    def open(cls, location: str | os.PathLike, mode: str = "r") -> Cache:
        """Open the cache at ``location`` (``mode="r+"`` to write); anything else there is an error."""
        location = os.fspath(location)
        try:
            group = zarr.open_group(location, mode=mode, zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
            raise InvcacheError(f"no cache at {location}") from None
        if group.attrs.get("schema_version") is None:
            raise InvcacheError(f"{location} is a zarr group but not an invcache cache")
        return cls(group, location)

    @staticmethod
    def probe(location: str | os.PathLike) -> str:
        """What is at ``location``: ``absent``, ``foreign`` (anything but a cache), or a cache's ``state``.

        Only a clean "nothing there" counts as absent; a store that fails for another reason raises.
        """
        location = os.fspath(location)
        local = "://" not in location
        if local and not Path(location).exists():
            return "absent"
        if local and not Path(location).is_dir():
            return "foreign"
        if local and not any(Path(location).iterdir()):
            return "absent"
        try:
            group = zarr.open_group(location, mode="r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
            return "foreign" if local else "absent"
        if group.attrs.get("schema_version") is None:
            return "foreign"
        return str(group.attrs.get("state", "ready"))

    @staticmethod
    def exists(location: str | os.PathLike) -> bool:
        """Whether a finished-creating cache is at ``location``."""
        return Cache.probe(location) == "ready"

    # -- layout ---------------------------------------------------------------------------

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def taps(self) -> list[str]:
        return list(self.group.attrs["taps"])

    @property
    def num_images(self) -> int:
        return int(self.group.attrs["num_images"])

    @property
    def shard_size(self) -> int:
        return int(self.group.attrs["shard_size"])

    @property
    def num_shards(self) -> int:
        return S.num_shards(self.num_images, self.shard_size)

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return f"<invcache cache {self.location}: {self.num_images} images, taps {', '.join(self.taps)}>"

    def __contains__(self, tap: object) -> bool:
        """Whether ``cache[tap]`` works: a stored tap, or ``dec.0`` when a decoder tap gives its shape."""
        if tap == DECODER_INPUT:
            return any(t.startswith("dec.") for t in self.taps)
        return tap in self.taps

    def __getitem__(self, tap: str) -> TapView:
        """A lazy view of one tap over every image; ``dec.0`` is a view of DETR's zero decoder input."""
        if not isinstance(tap, str) or tap not in self:
            raise UsageError(f"{self.location} has no tap {tap!r}; its taps: {', '.join(self.taps)}"
                             f"{' (and dec.0, all zeros)' if DECODER_INPUT in self else ''}")
        return TapView(self, tap)

    def tap_shape(self, tap: str) -> tuple[int, ...]:
        """(images, *per-image shape) of a tap; ``dec.0`` has the shape of every decoder tap."""
        if tap == DECODER_INPUT:
            return (self.num_images, *self._decoder_tap_shape())
        return tuple(self.array(tap).shape)

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_images)

    def rows_in(self, shards) -> int:
        """How many images the given shards hold (the last shard may be short)."""
        return sum(self.shard_bounds(s)[1] - self.shard_bounds(s)[0] for s in shards)

    def array(self, name: str) -> zarr.Array:
        """The zarr array of a tap or bookkeeping array (opened once: each open reads its metadata)."""
        if name not in self._arrays:
            try:
                with _numcodecs_quiet():
                    self._arrays[name] = self.group[S.array_path(name)]
            except KeyError:
                raise InvcacheError(f"{self.location} holds no {name!r}; its taps: {', '.join(self.taps)}") from None
        return self._arrays[name]

    @property
    def image_ids(self) -> np.ndarray:
        """The COCO id of every image (int64), ascending."""
        return self.read(S.IMAGE_ID, 0, self.num_images)

    @property
    def valid(self) -> np.ndarray:
        """Per image (bool): False where it could not be read, or its shard is not written yet."""
        return self.read(S.VALID, 0, self.num_images)

    def as_dataset(self, taps: list[str], **kwargs) -> CacheSamples:
        """The torch dataset training uses over ``taps``; ``kwargs`` go to :class:`CacheSamples`."""
        from invcache.cache.reader import CacheSamples

        return CacheSamples(self.location, taps, **kwargs)

    # -- writing --------------------------------------------------------------------------

    def complete_shards(self) -> np.ndarray:
        return self.read(S.SHARD_COMPLETE, 0, self.num_shards)

    def clear_shard(self, shard: int) -> None:
        """Delete whatever an interrupted write left of a shard, in every array."""
        for name in [*self.taps, *S.PER_IMAGE_ARRAYS]:
            array = self.array(name)
            chunk = shard * self.shard_size // array.chunks[0] if name in S.PER_IMAGE_ARRAYS else shard
            key = array.metadata.encode_chunk_key((chunk, *([0] * (array.ndim - 1))))
            sync(array.store_path.store.delete(f"{array.path}/{key}"))

    def write_shard(
        self,
        shard: int,
        taps: Mapping[str, np.ndarray],
        meta: Mapping[str, np.ndarray],
        pool: Executor | None = None,
    ) -> int:
        """Write one whole shard of every tap and bookkeeping array, then mark it complete.

        ``pool`` compresses the images of each tap in parallel. Returns the raw bytes written.
        """
        start, stop = self.shard_bounds(shard)
        written = 0
        for name, values in [*taps.items(), *meta.items()]:
            if len(values) != stop - start:
                raise ValueError(f"shard {shard} of {name}: {len(values)} rows, expected {stop - start}")
            if name in taps:
                self._codec(name).write(shard, values, pool)
            else:
                self.array(name)[start:stop] = values
            written += values.nbytes if values.dtype != object else 0
        self.array(S.SHARD_COMPLETE)[shard] = True
        return written

    # -- the mean training image ----------------------------------------------------------

    def sum_valid_input(self, shards: Iterable[int]) -> tuple[np.ndarray, int]:
        """The uint64 (H, W, 3) sum of ``input`` over the valid rows of ``shards``, and how many rows that is.

        Integer sums are exact and independent of order, so partial sums (per writer, per rank)
        add up to the same total however the shards were split.
        """
        if INPUT not in self.taps:
            raise UsageError(f"{self.location} has no {INPUT} tap to average")
        total = np.zeros(self.tap_shape(INPUT)[1:], np.uint64)
        count = 0
        for shard in shards:
            valid = self.read_shard(S.VALID, shard)
            if valid.any():
                block = self.read_shard(INPUT, shard)
                total += block.sum(axis=0, dtype=np.uint64, where=valid[:, None, None, None])
                count += int(valid.sum())
        return total, count

    def write_mean_image(self, total: np.ndarray, count: int) -> None:
        """Store ``mean_image`` = total / count / 255 (float64, [0, 1]) and its count, replacing any earlier one."""
        if INPUT not in self.taps:
            raise UsageError(f"{self.location} has no {INPUT} tap to average")
        row_shape = self.tap_shape(INPUT)[1:]
        if tuple(total.shape) != row_shape or count <= 0:
            raise UsageError(f"a mean image needs a sum of shape {row_shape} over at least one image, "
                             f"not shape {tuple(total.shape)} over {count}")
        array = self.group.create_array(S.MEAN_IMAGE, overwrite=True, fill_value=0.0,
                                        **S.mean_image_spec(row_shape))
        self._arrays[S.MEAN_IMAGE] = array
        array[...] = np.asarray(total, np.float64) / count / 255
        # The count goes in last: an array without it is a write cut short, never read as the mean.
        array.attrs[S.MEAN_IMAGE_COUNT] = int(count)

    def has_mean_image(self) -> bool:
        return S.MEAN_IMAGE in self.group and S.MEAN_IMAGE_COUNT in self.array(S.MEAN_IMAGE).attrs

    @property
    def mean_image(self) -> np.ndarray:
        """The mean of the valid ``input`` images, float64 (H, W, 3) in [0, 1]."""
        if not self.has_mean_image():
            raise InvcacheError(f"{self.location} has no mean image: {self._why_no_mean_image()}")
        return self.read(S.MEAN_IMAGE, 0, self.array(S.MEAN_IMAGE).shape[0])

    def _why_no_mean_image(self) -> str:
        if INPUT not in self.taps:
            return f"it has no {INPUT} tap"
        complete = self.complete_shards()
        if not complete.all():
            return f"its extraction has not finished ({int(complete.sum())} of {len(complete)} shards complete)"
        if not self.valid.any():
            return "none of its images is valid"
        return "its extraction did not write one (it was cut short while finishing, or predates mean images)"

    # -- reading --------------------------------------------------------------------------

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tap or bookkeeping array; ``dec.0`` reads as DETR's zero queries."""
        if name == DECODER_INPUT:
            return np.zeros((stop - start, *self._decoder_tap_shape()), S.FLOAT_DTYPE)
        array = self.array(name)
        with self._naming_corruption(name, self._shards_of(name, start, stop)):
            return array[start:stop]

    def read_shard(self, name: str, shard: int, complete: bool | None = None) -> np.ndarray:
        """All rows of one shard, decoded in one pass over its file for tap arrays.

        ``complete`` (looked up when not given) makes a missing image an error, not zeros.
        """
        if not 0 <= shard < self.num_shards:
            raise UsageError(f"{self.location} has shards 0 to {self.num_shards - 1}, not {shard}")
        start, stop = self.shard_bounds(shard)
        if name not in self.taps:
            return self.read(name, start, stop)
        if complete is None:
            complete = bool(self.read(S.SHARD_COMPLETE, shard, shard + 1)[0])
        with self._naming_corruption(name, f" shard {shard}"):
            return self._codec(name).decode(shard, stop - start, complete)

    def _shards_of(self, name: str, start: int, stop: int) -> str:
        """`` shard s`` (or `` shard a-b``) holding rows [start, stop) of ``name``, for error messages."""
        if name == S.MEAN_IMAGE:
            return ""
        per_shard = 1 if name == S.SHARD_COMPLETE else self.shard_size
        first, last = start // per_shard, (max(stop, start + 1) - 1) // per_shard
        return f" shard {first}" if first == last else f" shard {first}-{last}"

    @contextmanager
    def _naming_corruption(self, name: str, where: str) -> Iterator[None]:
        """Turn what damaged bytes raise into a :class:`CacheCorruptError` naming the array (and shard)."""
        try:
            yield
        except _CORRUPTION_TYPES as exc:
            if not is_corruption(exc):
                raise
            raise CacheCorruptError(
                f"{self.location}: array {S.array_path(name)}{where} does not verify ({type(exc).__name__}: {exc})"
            ) from None

    def _codec(self, name: str) -> ShardCodec:
        if name not in self._codecs:
            self._codecs[name] = ShardCodec(self.array(name))
        return self._codecs[name]

    def _decoder_tap_shape(self) -> tuple[int, ...]:
        """dec.0 has the shape of every decoder tap: (queries, d_model)."""
        decoder_taps = [t for t in self.taps if t.startswith("dec.")]
        if not decoder_taps:
            raise InvcacheError(f"{self.location}: dec.0 needs a cached decoder tap to know its shape")
        return tuple(self.array(decoder_taps[0]).shape[1:])

    def failures(self) -> list[dict]:
        """(image id, reason) of every invalid image in complete shards."""
        complete = self.complete_shards()
        valid, ids, reasons = self.valid, self.image_ids, self.read(S.FAILURE, 0, self.num_images)
        rows = [i for i in np.flatnonzero(~valid) if complete[i // self.shard_size]]
        return [{"image_id": int(ids[i]), "reason": str(reasons[i])} for i in rows]


def _fill(dtype) -> object:
    if dtype is str:
        return ""
    return False if dtype is bool else 0
