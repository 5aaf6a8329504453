"""Open, create, write and read caches: whole shards in, shard-sized blocks out."""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import Executor
from pathlib import Path

import numpy as np
import zarr
from zarr.core.sync import sync

from invcache.cache import schema as S
from invcache.cache.shard_codec import ShardCodec
from invcache.errors import InvcacheError
from invcache.settings import DEFAULT_SHARD_SIZE
from invcache.taps import DECODER_INPUT


class CacheCorruptError(InvcacheError):
    """A chunk whose checksum (or encoding) does not verify; the message names array and shard."""


class Cache:
    """A cache on disk (or any store zarr opens). Create with :meth:`create`, open with :meth:`open`."""

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
            group.create_array(
                S.array_path(tap), shape=(num_images, *shape), dtype=S.tap_dtype(tap),
                chunks=(1, *shape), shards=(shard_size, *shape), fill_value=0, **S.tap_codecs(tap, keepbits),
            )
        return cls(group, location)

    @classmethod
    def open(cls, location: str | os.PathLike, mode: str = "r") -> Cache:
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
        if local and (not Path(location).exists() or not any(Path(location).iterdir())):
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
                self._arrays[name] = self.group[S.array_path(name)]
            except KeyError:
                raise InvcacheError(f"{self.location} holds no {name!r}; its taps: {', '.join(self.taps)}") from None
        return self._arrays[name]

    def settings(self) -> dict:
        return {k: self.group.attrs.get(k) for k in S.SETTINGS_KEYS}

    # -- writing --------------------------------------------------------------------------

    def complete_shards(self) -> np.ndarray:
        return self.array(S.SHARD_COMPLETE)[:]

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

    # -- reading --------------------------------------------------------------------------

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tap or bookkeeping array; ``dec.0`` reads as DETR's zero queries."""
        if name == DECODER_INPUT:
            return np.zeros((stop - start, *self._decoder_tap_shape()), S.FLOAT_DTYPE)
        array = self.array(name)
        try:
            return array[start:stop]
        except (ValueError, RuntimeError, OSError) as exc:  # checksum, codec and truncated-file errors
            first, last = start // self.shard_size, (max(stop, start + 1) - 1) // self.shard_size
            raise self._corrupt(name, str(first) if first == last else f"{first}-{last}", exc) from None

    def read_shard(self, name: str, shard: int, complete: bool | None = None) -> np.ndarray:
        """All rows of one shard, decoded in one pass over its file for tap arrays.

        ``complete`` (looked up when not given) makes a missing image an error, not zeros.
        """
        start, stop = self.shard_bounds(shard)
        if name not in self.taps:
            return self.read(name, start, stop)
        if complete is None:
            complete = bool(self.array(S.SHARD_COMPLETE)[shard])
        try:
            return self._codec(name).decode(shard, stop - start, complete)
        except (ValueError, RuntimeError, OSError) as exc:  # checksum, codec and truncated-file errors
            raise self._corrupt(name, str(shard), exc) from None

    def _corrupt(self, name: str, shards: str, exc: Exception) -> CacheCorruptError:
        return CacheCorruptError(
            f"{self.location}: array {S.array_path(name)} shard {shards} does not verify ({type(exc).__name__}: {exc})"
        )

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
        valid, ids, reasons = self.array(S.VALID)[:], self.array(S.IMAGE_ID)[:], self.array(S.FAILURE)[:]
        rows = [i for i in np.flatnonzero(~valid) if complete[i // self.shard_size]]
        return [{"image_id": int(ids[i]), "reason": str(reasons[i])} for i in rows]


def _fill(dtype) -> object:
    if dtype is str:
        return ""
    return False if dtype is bool else 0
