"""A lazy view of one tap of a cache: numpy-style row indexing, read as whole shards.

``cache["enc.3"][rows]`` groups the requested rows by shard and decodes each needed shard
once, through ``Cache.read_shard`` (every crc32c checked; zarr's ``oindex`` on sharded
arrays is very slow, and even a single row costs a shard-sized read either way). Rows
come back in the order asked, in the stored dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from invcache.taps import DECODER_INPUT

if TYPE_CHECKING:
    import torch

    from invcache.cache.store import Cache


class TapView:
    """Rows of one tap over every image of a cache; nothing is read until it is indexed."""

    def __init__(self, cache: Cache, tap: str) -> None:
        self.cache, self.tap = cache, tap
        self.shape: tuple[int, ...] = cache.tap_shape(tap)
        self.dtype: np.dtype = np.dtype(np.float16) if tap == DECODER_INPUT else cache.array(tap).dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"<{self.tap} of {self.cache.location}: shape {self.shape}, {self.dtype}>"

    def __getitem__(self, key) -> np.ndarray:
        """``view[rows]`` or ``view[rows, ...]``: rows by int, slice, int list/array or boolean mask."""
        rows_key, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
        if rows_key is Ellipsis:
            rows_key, rest = slice(None), key if isinstance(key, tuple) else ()
        rows, out_shape = _row_indices(rows_key, len(self))
        out = self._gather(rows).reshape(*out_shape, *self.shape[1:])
        if rest:
            out = out[(slice(None),) * len(out_shape) + rest]
        return out

    def __iter__(self) -> Iterator[np.ndarray]:
        """Rows in order, one shard decoded at a time (indexing row by row would decode a shard per row)."""
        step = self.cache.shard_size
        for start in range(0, len(self), step):
            yield from self[start:start + step]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype, copy=False)

    @property
    def torch(self) -> _TorchRows:
        """``view.torch[rows]``: the same rows as ``view[rows]``, as a torch tensor."""
        return _TorchRows(self)

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        out = np.zeros((len(rows), *self.shape[1:]), self.dtype)
        if self.tap == DECODER_INPUT or not len(rows):
            return out
        shard_size = self.cache.shard_size
        shards = rows // shard_size
        for shard in np.unique(shards).tolist():
            wanted = np.flatnonzero(shards == shard)
            block = self.cache.read_shard(self.tap, shard)
            out[wanted] = block[rows[wanted] - shard * shard_size]
        return out


class _TorchRows:
    """The ``.torch`` indexer of a :class:`TapView`."""

    def __init__(self, view: TapView) -> None:
        self.view = view

    def __getitem__(self, key) -> torch.Tensor:
        import torch

        return torch.from_numpy(np.asarray(self.view[key]))


def _row_indices(key, length: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """The 0-based rows a numpy-style index selects, and the leading shape of the result (``()`` for an int)."""
    if isinstance(key, slice):
        rows = np.arange(*key.indices(length))
        return rows, (len(rows),)
    if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
        return _in_range(np.array([key], np.int64), length), ()
    index = np.asarray(key)
    if index.dtype == bool:
        if index.shape != (length,):
            raise IndexError(f"a boolean mask over {length} images has shape {index.shape}")
        rows = np.flatnonzero(index)
        return rows, (len(rows),)
    if index.size == 0:
        index = index.astype(np.int64)
    if index.dtype.kind not in "iu":
        raise IndexError(f"rows are indexed by int, slice, int array or boolean mask, not {type(key).__name__}")
    return _in_range(index.astype(np.int64).ravel(), length), index.shape


def _in_range(rows: np.ndarray, length: int) -> np.ndarray:
    if rows.size and (rows.min() < -length or rows.max() >= length):
        bad = rows[(rows < -length) | (rows >= length)][0]
        raise IndexError(f"image {bad} is out of range for {length} images")
    return np.where(rows < 0, rows + length, rows)
