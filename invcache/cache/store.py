"""Open, create, write and read caches: whole shards in, shard-sized blocks out.

Every read checks what it returns against the files. A tap's rows come from whole-shard reads
(every image's crc32c, and the file's digest against the one recorded when its shard completed);
a bookkeeping read requires every chunk a complete shard must have, because zarr reads a missing
chunk as its fill value (zeros, False) without a word. Opening checks the metadata every reader
relies on and raises one line naming the file and what is wrong.
"""

from __future__ import annotations

import asyncio
import operator
import os
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr
from zarr.core.sync import sync

from invcache.cache import schema as S
from invcache.cache.shard_codec import ChecksumError, ShardCodec, ShardLayoutError
from invcache.cache.view import TapView
from invcache.errors import InvcacheError, UsageError
from invcache.settings import DEFAULT_SHARD_SIZE
from invcache.taps import DECODER_INPUT, INPUT

if TYPE_CHECKING:
    from invcache.cache.batches import CacheBatches
    from invcache.cache.reader import CacheSamples


class CacheCorruptError(InvcacheError):
    """Damaged data or metadata: the message names the array and shard, or the file and what is wrong."""


# What damaged bytes raise, as (type, message prefix). zarr's crc32c codec and numcodecs' Blosc and
# Zstd raise plain ValueError / RuntimeError, so only the message tells damage from a programming
# error (a bad argument), which must surface as itself rather than as "does not verify".
CORRUPTION_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (ChecksumError, ""),  # invcache's shard decoder: crc32c mismatch, truncated shard, missing image or file
    (ValueError, "Stored and computed checksum do not match"),  # zarr.codecs.crc32c_: any chunk or shard index
    (RuntimeError, "error during blosc decompression"),  # numcodecs.blosc
    (ValueError, "JPEG XL decoding failed"),  # image_codec: a chunk whose crc32c holds that is no image of the row
    (RuntimeError, "Zstd decompression error"),  # numcodecs.zstd (bookkeeping arrays)
)
_CORRUPTION_TYPES = tuple(kind for kind, _ in CORRUPTION_ERRORS)


def is_corruption(exc: BaseException) -> bool:
    """Whether ``exc`` is one of :data:`CORRUPTION_ERRORS`: what damaged bytes raise."""
    return any(isinstance(exc, kind) and str(exc).startswith(prefix) for kind, prefix in CORRUPTION_ERRORS)


# What zarr raises for a zarr.json it cannot parse or finds invalid: JSON and UTF-8 errors, unknown codecs
# (ValueError), a mistyped field (TypeError), a missing field or node (KeyError). Reading metadata is only
# parsing stored bytes, so these are damage there; an OSError (permissions, I/O) propagates as itself.
_METADATA_ERRORS = (ValueError, TypeError, KeyError)
# Root attributes only Cache.create writes: a group with some of them but no schema_version is a damaged cache.
_CACHE_ATTRIBUTES = ("taps", "shard_size", "num_images", "codec")
# zarr does not store a chunk equal to the fill value (an all-invalid shard's ``valid``); bookkeeping chunks
# are always stored, so that a missing one is damage rather than "all False".
_STORE_EMPTY_CHUNKS = {"write_empty_chunks": True}
# How many problems one error line names (``invcache verify`` lists them all).
_PROBLEMS_PER_LINE = 3
# The tasks settling zarr's event loop after damage (touched only on that loop, so without a lock), and
# how long one waits for the loop's other tasks.
_SETTLING: set[asyncio.Task] = set()
_SETTLE_SECONDS = 10.0


@dataclass
class MetadataCheck:
    """What :meth:`Cache.check_metadata` found."""

    problems: list[str]  # each names its file
    shards_known: bool  # taps, shard_size and num_images are sound and agree with the arrays: shards can be read
    unreadable: set[str]  # arrays whose metadata cannot be read


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
        uncompressed: Sequence[str] | None = None,
        attributes: Mapping | None = None,
    ) -> Cache:
        """Create every array of an empty cache (replacing anything at ``location``).

        ``uncompressed`` lists the taps stored without a compressor (what
        :func:`invcache.cache.codec_choice.choose_uncompressed` measured; by default ``schema.UNCOMPRESSED``).

        The root ``zarr.json`` is written once, with every attribute in it (zarr's LocalStore writes
        it to a temporary file and renames it; an object store puts it whole): a creation cut short
        at any moment leaves nothing, or a group that says it is a cache in whatever ``state`` the
        caller gave, never a group without attributes, which would read as a foreign one.
        """
        location = os.fspath(location)
        if not tap_shapes:
            raise UsageError("a cache holds at least one tap")
        group = zarr.open_group(location, mode="w", zarr_format=3, attributes={
            **(attributes or {}),
            "schema_version": S.SCHEMA_VERSION,
            "taps": list(tap_shapes),
            "shard_size": shard_size,
            "num_images": num_images,
            "codec": (codec := S.codec_record(keepbits, uncompressed)),
        })
        cache = cls(group, location)
        for name, spec in S.bookkeeping_array_specs(num_images, shard_size, len(tap_shapes)).items():
            cache._arrays[name] = group.create_array(name, fill_value=_fill(spec["dtype"]), config=_STORE_EMPTY_CHUNKS,
                                                     **spec)
        for tap, shape in tap_shapes.items():
            with _numcodecs_quiet():
                group.create_array(
                    S.array_path(tap), shape=(num_images, *shape), dtype=S.tap_dtype(tap), chunks=(1, *shape),
                    shards=(shard_size, *shape), fill_value=0, **S.tap_codecs(tap, codec), **S.tap_labels(tap),
                )
        return cache

    @classmethod
    def open(cls, location: str | os.PathLike, mode: str = "r", *, check: bool = True) -> Cache:
        """Open the cache at ``location`` (``mode="r+"`` to write); anything else there is an error.

        Its metadata is checked (:meth:`check_metadata`): what is wrong raises one
        :class:`CacheCorruptError` naming the files. ``check=False`` leaves that to the caller
        (``verify``, which lists every problem).
        """
        location = os.fspath(location)
        group = _root_group(location, mode)
        if group is None:
            raise InvcacheError(f"no cache at {location}")
        if not _is_cache(group, location):
            raise InvcacheError(f"{location} is a zarr group but not an invcache cache")
        cache = cls(group, location)
        if check:
            problems = cache.check_metadata().problems
            if problems:
                more = len(problems) - _PROBLEMS_PER_LINE
                raise CacheCorruptError("; ".join(problems[:_PROBLEMS_PER_LINE])
                                        + (f"; and {more} more (invcache verify lists them)" if more > 0 else ""))
        return cache

    @staticmethod
    def probe(location: str | os.PathLike) -> str:
        """What is at ``location``: ``absent``, ``foreign`` (anything but a cache), or a cache's ``state``.

        Only a clean "nothing there" counts as absent; a store that fails for another reason raises,
        and so does a cache whose root metadata is damaged (:class:`CacheCorruptError`): it is not
        foreign, and nothing may treat it as absent.
        """
        location = os.fspath(location)
        local = "://" not in location
        if local and not Path(location).exists():
            return "absent"
        if local and not Path(location).is_dir():
            return "foreign"
        if local and not any(Path(location).iterdir()):
            return "absent"
        group = _root_group(location, "r")
        if group is None:
            return "foreign" if local else "absent"
        if not _is_cache(group, location):
            return "foreign"
        return str(group.attrs.get("state", "ready"))

    @staticmethod
    def exists(location: str | os.PathLike) -> bool:
        """Whether a finished-creating cache is at ``location``."""
        return Cache.probe(location) == "ready"

    def check_metadata(self) -> MetadataCheck:
        """Check what readers rely on; each problem names its file.

        The root attributes (schema_version, taps, shard_size, num_images, codec, state, and the
        provenance training and the analyses read: model, preprocessing); every tap's and
        bookkeeping array's metadata, readable and agreeing with them; the taps' row shapes against
        the model and image size recorded. With the root attributes unsound, the arrays are not
        looked at (which arrays there should be, and their shapes, follow from those attributes).
        """
        root = self._file("zarr.json")
        attrs = self.attrs
        if attrs.get("state") == "creating":
            return MetadataCheck([f"{root}: the cache is being created (or its creation was cut short: then "
                                  "rerun the extract command that makes it)"], False, set())
        layout = S.layout_problems(attrs)
        provenance = S.provenance_problems(attrs)
        problems = [f"{root}: {problem}" for problem in layout + provenance]
        if layout:
            return MetadataCheck(problems, False, set())
        arrays: dict[str, zarr.Array] = {}
        for name in [*self.taps, *S.PER_IMAGE_ARRAYS, *S.PER_SHARD_ARRAYS]:
            try:
                arrays[name] = self.array(name)
            except CacheCorruptError as exc:
                problems.append(str(exc))
        unreadable = {name for name in [*self.taps, *S.PER_IMAGE_ARRAYS, *S.PER_SHARD_ARRAYS] if name not in arrays}
        edited = self._edited_attributes(arrays, attrs)
        problems += edited
        shards_known = not edited
        if not edited:  # else every array disagrees with the attribute, which is named once
            for name, array in arrays.items():
                try:
                    found = S.array_problems(name, array, attrs)
                    if name in self.taps and not found:
                        self._codec(name)
                except ShardLayoutError as exc:
                    found = [str(exc)]
                shards_known &= not found
                problems += [f"{self._file(S.array_path(name), 'zarr.json')}: {problem}" for problem in found]
        readable_taps = [t for t in self.taps if t not in unreadable]
        if shards_known:
            problems += self._codec_problems(readable_taps, attrs["codec"])
            if not provenance:
                problems += self._shape_problems(readable_taps, attrs)
        if self._stored(S.MEAN_IMAGE, "zarr.json"):
            try:
                mean_image = self.array(S.MEAN_IMAGE)
            except CacheCorruptError as exc:
                problems.append(str(exc))
            else:
                if INPUT in readable_taps:
                    problems += [f"{self._file(S.MEAN_IMAGE, 'zarr.json')}: {problem}"
                                 for problem in S.mean_image_problems(mean_image, self.tap_shape(INPUT)[1:])]
        return MetadataCheck(problems, shards_known, unreadable)

    def _edited_attributes(self, arrays: Mapping[str, zarr.Array], attrs: Mapping) -> list[str]:
        """``shard_size`` or ``num_images`` where every array agrees on another value: the attribute was changed.

        Named once, at the root, rather than as a disagreement of each array.
        """
        taps = [arrays[t] for t in self.taps if t in arrays]
        found = {
            "shard_size": ({a.shards[0] for a in taps if a.shards}, "every tap is stored in shards of {} images"),
            "num_images": ({a.shape[0] for a in [*taps, *(arrays[n] for n in S.PER_IMAGE_ARRAYS if n in arrays)]},
                           "every array holds {} images"),
        }
        return [f"{self._file('zarr.json')}: {key} is {attrs[key]}, but {stored.format(next(iter(values)))}"
                for key, (values, stored) in found.items() if len(values) == 1 and attrs[key] not in values]

    def _codec_problems(self, taps: Sequence[str], codec: Mapping) -> list[str]:
        """Taps whose BitRound filter or compressor disagrees with the ``codec`` attribute (``info`` reports its
        error from there)."""
        problems, keepbits = [], codec["keepbits"]
        for tap in taps:
            shard_codec, where = self._codec(tap), self._file(S.array_path(tap), "zarr.json")
            stored = None if shard_codec.bitround is None else shard_codec.bitround.keepbits
            if stored != (None if tap == INPUT else keepbits):
                problems.append(f"{where}: BitRound keepbits {stored}, but codec.keepbits is {keepbits}")
            if (shard_codec.image is not None) != S.stored_as_image(tap, codec):
                problems.append(f"{where}: {'an' if shard_codec.image is not None else 'no'} image codec, but the "
                                f"codec record {'has no' if 'input' not in codec else 'has an'} input codec")
            elif (shard_codec.blosc is not None) != S.compressed(tap, codec):
                problems.append(f"{where}: {'Blosc' if shard_codec.blosc is not None else 'no compressor'}, but "
                                f"codec.uncompressed is {codec.get('uncompressed', [])}")
        return problems

    def _shape_problems(self, taps: Sequence[str], attrs: Mapping) -> list[str]:
        """Taps whose rows disagree with the model and image size recorded (SPEC §1's shapes)."""
        if "model" not in attrs or "preprocessing" not in attrs:
            return []
        config, size = attrs["model"]["config"], attrs["preprocessing"]["size"]
        problems = []
        for tap in taps:
            expected = S.provenance_row_shape(tap, config, size)
            actual = tuple(self.array(tap).shape[1:])
            if expected is None:
                problems.append(f"{self._file('zarr.json')}: taps lists {tap}, which model.config "
                                f"({config['name']}) does not have")
            elif len(expected) != len(actual) or any(e not in (None, a) for e, a in zip(expected, actual)):
                shown = tuple("any" if e is None else e for e in expected)
                problems.append(f"{self._file(S.array_path(tap), 'zarr.json')}: rows of shape {actual}, but "
                                f"model.config and preprocessing.size make {tap} rows {shown}")
        return problems

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
        """The zarr array of a tap or bookkeeping array (opened once: each open reads its metadata).

        A listed tap or a bookkeeping array whose metadata is missing or unreadable is a
        :class:`CacheCorruptError` naming its ``zarr.json``.
        """
        if name not in self._arrays:
            path = S.array_path(name)
            try:
                with _numcodecs_quiet():
                    array = self.group[path]
            except _METADATA_ERRORS as exc:
                raise self._unreadable(name, path, exc) from None
            if name in S.BOOKKEEPING_ARRAYS:
                array = array.with_config(_STORE_EMPTY_CHUNKS)
            self._arrays[name] = array
        return self._arrays[name]

    def _unreadable(self, name: str, path: str, exc: Exception) -> InvcacheError:
        metadata = self._file(path, "zarr.json")
        if isinstance(exc, KeyError) and not self._stored(path, "zarr.json"):
            if name in S.BOOKKEEPING_ARRAYS or name in self.taps:
                return CacheCorruptError(f"{metadata} is missing")
            return InvcacheError(f"{self.location} holds no {name!r}; its taps: {', '.join(self.taps)}")
        return CacheCorruptError(f"{metadata} cannot be read ({type(exc).__name__}: {exc})")

    def _file(self, *parts: str) -> str:
        """A file of the cache, for messages."""
        return "/".join([self.location.rstrip("/"), *parts])

    def _stored(self, *parts: str) -> bool:
        """Whether the store holds the key ``parts`` joined (relative to the cache's group)."""
        return sync(self.group.store_path.store.exists("/".join(p for p in (self.group.path, *parts) if p)))

    @property
    def image_ids(self) -> np.ndarray:
        """The COCO id of every image (int64), ascending."""
        return self.read(S.IMAGE_ID, 0, self.num_images)

    @property
    def valid(self) -> np.ndarray:
        """Per image (bool): False where it could not be read, or its shard is not written yet."""
        return self.read(S.VALID, 0, self.num_images)

    def as_dataset(self, taps: list[str], **kwargs) -> CacheSamples:
        """A torch dataset of single samples of ``taps`` (for a DataLoader); ``kwargs`` go to :class:`CacheSamples`."""
        from invcache.cache.reader import CacheSamples

        return CacheSamples(self.location, taps, **kwargs)

    def as_batches(self, taps: list[str], batch_size: int, **kwargs) -> CacheBatches:
        """Shuffled batches of ``taps`` as training reads them; ``kwargs`` go to :class:`CacheBatches`."""
        from invcache.cache.batches import CacheBatches

        return CacheBatches(self.location, taps, batch_size, **kwargs)

    # -- writing --------------------------------------------------------------------------

    def complete_shards(self) -> np.ndarray:
        return self.read(S.SHARD_COMPLETE, 0, self.num_shards)

    def clear_shard(self, shard: int) -> None:
        """Delete whatever an interrupted write left of a shard, in every array (chunk ``shard`` of each)."""
        for name in [*self.taps, *S.PER_IMAGE_ARRAYS, S.SHARD_DIGEST]:
            sync(self.array(name).store_path.store.delete(self._chunk_key(name, shard)))

    def write_shard(
        self,
        shard: int,
        taps: Mapping[str, np.ndarray],
        meta: Mapping[str, np.ndarray],
        pool: Executor | None = None,
    ) -> int:
        """Write one whole shard of every tap and per-image array, record its files' digests, then mark it complete.

        ``pool`` compresses the images of each tap in parallel. Returns the raw bytes written.
        """
        if set(taps) != set(self.taps) or set(meta) != set(S.PER_IMAGE_ARRAYS):
            raise ValueError(f"shard {shard}: a shard is written whole: taps {', '.join(self.taps)} and "
                             f"{', '.join(S.PER_IMAGE_ARRAYS)}, not {', '.join([*taps, *meta])}")
        start, stop = self.shard_bounds(shard)
        written = 0
        digests = np.zeros(len(self.taps), np.uint32)
        for name, values in [*taps.items(), *meta.items()]:
            if len(values) != stop - start:
                raise ValueError(f"shard {shard} of {name}: {len(values)} rows, expected {stop - start}")
            if name in taps:
                digests[self.taps.index(name)] = self._codec(name).write(shard, values, pool)
            else:
                self.array(name)[start:stop] = values
            written += values.nbytes if values.dtype != object else 0
        # The digests bind each tap's file to this shard (verify and readers compare them).
        self.array(S.SHARD_DIGEST)[shard] = digests
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
                total += S.sum_images(block, valid)
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
        array = self.group.create_array(S.MEAN_IMAGE, overwrite=True, fill_value=0.0, config=_STORE_EMPTY_CHUNKS,
                                        **S.mean_image_spec(row_shape))
        self._arrays[S.MEAN_IMAGE] = array
        array[...] = np.asarray(total, np.float64) / count / 255
        # The count goes in last: an array without it is a write cut short, never read as the mean.
        array.attrs[S.MEAN_IMAGE_COUNT] = int(count)

    def has_mean_image(self) -> bool:
        return self._stored(S.MEAN_IMAGE, "zarr.json") and S.MEAN_IMAGE_COUNT in self.array(S.MEAN_IMAGE).attrs

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
        """Rows [start, stop) of a tap or bookkeeping array (as a slice would take them); ``dec.0`` reads as
        DETR's zero queries.

        A tap's rows come from whole-shard reads (:meth:`read_shard`), so a complete shard's file is
        checked whole; a bookkeeping read requires every chunk a complete shard must have.
        """
        if name == DECODER_INPUT:
            start, stop, _ = slice(start, stop).indices(self.num_images)
            return np.zeros((max(stop - start, 0), *self._decoder_tap_shape()), S.FLOAT_DTYPE)
        if name not in self.taps:
            return self._read_bookkeeping(name, start, stop)
        start, stop, _ = slice(start, stop).indices(self.num_images)
        stop = max(start, stop)
        blocks = []
        for shard in range(start // self.shard_size, -(-stop // self.shard_size)):
            first = self.shard_bounds(shard)[0]
            blocks.append(self.read_shard(name, shard)[max(start, first) - first:stop - first])
        if not blocks:
            return np.zeros((0, *self.tap_shape(name)[1:]), self.array(name).dtype)
        return np.concatenate(blocks)

    def read_shard(self, name: str, shard: int, complete: bool | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
        """All rows of one shard; a tap's decoded in one pass over its file.

        ``complete`` (looked up when not given) makes a missing image, file or bookkeeping chunk
        an error rather than zeros, and has a tap's file compared with the digest recorded when
        the shard completed. ``out``, for a stored tap only: a contiguous buffer of the shard's
        shape and the tap's dtype to decode into (a reader's recycled one) instead of a new array.
        """
        shard = operator.index(shard)
        if not 0 <= shard < self.num_shards:
            raise UsageError(f"{self.location} has shards 0 to {self.num_shards - 1}, not {shard}")
        if out is not None and (name == DECODER_INPUT or name not in self.taps):
            raise UsageError(f"read_shard decodes into out only for a stored tap, not {name}")
        if name == DECODER_INPUT:
            return self.read(name, *self.shard_bounds(shard))
        if name not in self.taps:
            rows = (shard, shard + 1) if name in S.PER_SHARD_ARRAYS else self.shard_bounds(shard)
            return self._read_bookkeeping(name, *rows, complete=complete)
        if complete is None:
            complete = self._is_complete(shard)
        return self.decode_shard(name, shard, complete, self._digest(name, shard) if complete else None, out)

    def decode_shard(self, tap: str, shard: int, complete: bool, digest: int | None,
                     out: np.ndarray | None = None) -> np.ndarray:
        """One tap's shard checked against what the bookkeeping says of it (:meth:`read_shard` looks that up).

        ``complete`` makes a missing file or image damage; ``digest``, the one recorded when the
        shard completed (None: not compared), binds the file to this shard; ``out`` as for :meth:`read_shard`.
        """
        start, stop = self.shard_bounds(shard)
        with self._naming_corruption(tap, f" shard {shard}"):
            return self._codec(tap).decode(shard, stop - start, complete, digest, out)

    def _read_bookkeeping(self, name: str, start: int, stop: int, complete: bool | None = None) -> np.ndarray:
        """Rows [start, stop) of a bookkeeping array, every chunk they need present.

        Chunk ``s`` of a per-image array or of ``shard_digest`` is shard ``s``'s: required when the
        shard is complete (``complete`` says so for a one-shard read, else its flag is read). A
        shard's flag is written as it completes, so a missing one reads as "not complete", except
        in a cache whose root attribute ``complete`` is true: there every flag is required. The
        chunk of ``mean_image`` is required.
        """
        array = self.array(name)
        start, stop, _ = slice(start, stop).indices(array.shape[0])
        per_chunk = array.chunks[0]
        chunks = range(start // per_chunk, -(-max(start, stop) // per_chunk))
        stored = sync(_all_exist(array.store_path.store, [self._chunk_key(name, c) for c in chunks]))
        missing = [c for c, there in zip(chunks, stored) if not there]
        if name in S.PER_IMAGE_ARRAYS or name == S.SHARD_DIGEST:
            missing = [c for c in missing if (complete if complete is not None else self._is_complete(c))]
        elif name == S.SHARD_COMPLETE and self.group.attrs.get("complete") is not True:
            missing = []
        if missing:
            raise self._missing_chunks(name, missing)
        with self._naming_corruption(name, self._shards_of(name, start, stop)):
            return array[start:stop]

    def _is_complete(self, shard: int) -> bool:
        return bool(self._read_bookkeeping(S.SHARD_COMPLETE, shard, shard + 1)[0])

    def shard_digests(self, tap: str) -> np.ndarray:
        """Per shard, the digest of ``tap``'s file recorded when the shard completed (0 where it is not complete):
        what :meth:`decode_shard` compares, read once for a reader of many shards."""
        return self._read_bookkeeping(S.SHARD_DIGEST, 0, self.num_shards)[:, self.taps.index(tap)]

    def _digest(self, tap: str, shard: int) -> int:
        """The digest of ``tap``'s file of (complete) shard ``shard``, recorded when the shard completed."""
        return int(self._read_bookkeeping(S.SHARD_DIGEST, shard, shard + 1, complete=True)[0, self.taps.index(tap)])

    def _chunk_key(self, name: str, chunk: int) -> str:
        """The store key of chunk ``chunk`` (along the first dimension; one chunk across the others) of an array."""
        array = self.array(name)
        return f"{array.path}/{array.metadata.encode_chunk_key((chunk, *([0] * (array.ndim - 1))))}"

    def _missing_chunks(self, name: str, chunks: list[int]) -> CacheCorruptError:
        keys = _listing([self._chunk_key(name, c) for c in chunks])
        array = f"{self.location}: array {S.array_path(name)}"
        if name == S.MEAN_IMAGE:
            return CacheCorruptError(f"{array} does not verify (chunk {keys} is missing)")
        shards = f" shard {chunks[0]} does" if len(chunks) == 1 else f" shards {_listing(chunks)} do"
        why = ("the cache is marked complete" if name == S.SHARD_COMPLETE
               else "every chunk of a complete shard is stored")
        return CacheCorruptError(f"{array}{shards} not verify (missing chunk {keys}: {why})")

    def _shards_of(self, name: str, start: int, stop: int) -> str:
        """`` shard s`` (or `` shard a-b``) holding rows [start, stop) of ``name``, for error messages."""
        if name == S.MEAN_IMAGE:
            return ""
        per_shard = 1 if name in S.PER_SHARD_ARRAYS else self.shard_size
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
            # zarr reads a range's chunks concurrently and leaves the others running when one fails; a
            # program that exits on this error would have asyncio print "Task was destroyed but it is
            # pending!" for each, after the one line the error is meant to be.
            sync(_settle_zarr_tasks())
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


def _root_group(location: str, mode: str) -> zarr.Group | None:
    """The zarr group at ``location``, or None where there is none; unreadable root metadata is damage."""
    try:
        return zarr.open_group(location, mode=mode, zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        return None
    except _METADATA_ERRORS as exc:
        raise CacheCorruptError(f"{location.rstrip('/')}/zarr.json: the root metadata cannot be read "
                                f"({type(exc).__name__}: {exc})") from None


def _is_cache(group: zarr.Group, location: str) -> bool:
    """Whether a zarr group is a cache; one with a cache's attributes but no schema version is a damaged cache."""
    if group.attrs.get("schema_version") is not None:
        return True
    found = [key for key in _CACHE_ATTRIBUTES if key in group.attrs]
    if found:
        raise CacheCorruptError(f"{location.rstrip('/')}/zarr.json: schema_version is missing, though its "
                                f"{', '.join(found)} are a cache's")
    return False


async def _settle_zarr_tasks() -> None:
    """Wait (a while) for the other tasks on zarr's event loop, where ``sync`` runs this, to finish.

    Threads that hit damage at once settle at once: each leaves the others' settling out, or they
    would wait for each other, and the timeout bounds the wait on anything else.
    """
    current = asyncio.current_task()
    _SETTLING.add(current)
    try:
        others = {task for task in asyncio.all_tasks() if task not in _SETTLING}
        if others:
            await asyncio.wait(others, timeout=_SETTLE_SECONDS)
    finally:
        _SETTLING.discard(current)


async def _all_exist(store: zarr.abc.store.Store, keys: Sequence[str]) -> list[bool]:
    return list(await asyncio.gather(*(store.exists(key) for key in keys)))


def _listing(items: Sequence[object], limit: int = 3) -> str:
    """``a, b, c and 4 more``: a list for a one-line message."""
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _fill(dtype) -> object:
    if dtype is str:
        return ""
    return False if dtype is bool else 0
