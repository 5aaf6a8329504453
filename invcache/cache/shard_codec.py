"""Encode (and decode) a whole zarr v3 shard in one call, with one put (or get) of its file.

zarr's generic write path encodes a shard's inner chunks through its asyncio pipeline at
about half the speed of the codecs themselves (measured: benchmarks/writer.py). A cache
shard is always written whole, so this module produces the same bytes zarr would — the
``sharding_indexed`` layout of the array's own metadata: one chunk per image, each
[BitRound →] [Blosc →] crc32c (``input``: lossless JPEG XL → crc32c), then the (offset, length)
index with its crc32c at the end —
with numcodecs called directly (it releases the GIL, so writer threads compress in
parallel). The tests read every written shard back through zarr as well.

Reading a whole shard has the same problem (zarr decodes at about a third of Blosc's
speed), so :meth:`ShardCodec.decode` reads the file once, checks the index's and every
chunk's crc32c and decompresses the chunks directly.

Every chunk's crc32c still passes when a whole valid shard file sits at the wrong place (moved,
swapped with another shard's, or replaced by another cache's), so :meth:`ShardCodec.write`
returns the shard's digest (:func:`shard_digest`), which the cache records per shard, and
:meth:`ShardCodec.decode` compares it when given.
"""

from __future__ import annotations

import os
import uuid
from concurrent.futures import Executor
from pathlib import Path

import numpy as np
import zarr

# The crc32c package rather than google_crc32c (which zarr uses): it releases the GIL, so the reader's and the
# writers' threads check and compute checksums in parallel (2 threads: 11 GB/s against 3.6 on the CPU box).
from crc32c import crc32c
from numcodecs import BitRound, Blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from invcache.cache.image_codec import JpegXlCodec

_EMPTY = np.iinfo(np.uint64).max


class ShardCodec:
    """Encoder for the shards of one array, configured from that array's zarr metadata."""

    def __init__(self, array: zarr.Array) -> None:
        sharding = [c for c in array.metadata.codecs if isinstance(c, ShardingCodec)]
        if len(sharding) != 1 or array.shards is None:
            raise ShardLayoutError(f"codecs {array.metadata.codecs} are not one sharding codec")
        self.array = array
        self.chunks_per_shard = array.shards[0] // array.chunks[0]
        self.row_shape = tuple(array.shape[1:])
        inner = list(sharding[0].codecs)
        filters = [c for c in inner if type(c).__name__ == "BitRound"]
        rest = [c for c in inner if c not in filters]
        kinds = [type(c) for c in rest]
        if kinds not in ([BytesCodec, BloscCodec, Crc32cCodec], [BytesCodec, Crc32cCodec], [JpegXlCodec, Crc32cCodec]):
            raise ShardLayoutError(f"inner codecs {inner} are not the cache schema's")
        if kinds[0] is JpegXlCodec and (filters or array.dtype != np.uint8 or array.shape[-1] != 3):
            raise ShardLayoutError(f"inner codecs {inner} on {array.dtype} rows {array.shape[1:]}: the image codec "
                                   "stores RGB uint8 rows without filters")
        self.image = rest[0] if kinds[0] is JpegXlCodec else None
        blosc = rest[1] if kinds[1] is BloscCodec else None  # None: stored without a compressor
        self.blosc = None if blosc is None else Blosc(
            cname=blosc.cname.value, clevel=blosc.clevel, shuffle=_SHUFFLE[blosc.shuffle.value],
            blocksize=blosc.blocksize, typesize=blosc.typesize)
        self.bitround = BitRound(keepbits=filters[0].codec_config["keepbits"]) if filters else None
        self.dtype = array.dtype

    def _encode_rows(self, rows: np.ndarray) -> list[bytes]:
        pieces = []
        for row in rows:
            if self.image is not None:
                pieces.append((stored := self.image.encode_image(row)) + np.uint32(crc32c(stored)).tobytes())
                continue
            data = self.bitround.encode(row) if self.bitround is not None else row
            raw = np.ascontiguousarray(data).view(np.uint8).ravel()
            stored = bytes(self.blosc.encode(raw) if self.blosc is not None else raw)
            pieces.append(stored + np.uint32(crc32c(stored)).tobytes())
        return pieces

    def encode(self, rows: np.ndarray, pool: Executor | None = None) -> list[bytes]:
        """The shard's bytes, as pieces to concatenate; with ``pool``, blocks of images compress in parallel."""
        if rows.shape[1:] != self.row_shape or len(rows) > self.chunks_per_shard:
            raise ValueError(f"{self.array.path}: rows of shape {rows.shape} do not fit a shard")
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        blocks = [rows[i:i + _ROWS_PER_TASK] for i in range(0, len(rows), _ROWS_PER_TASK)]
        encoded = pool.map(self._encode_rows, blocks) if pool is not None else map(self._encode_rows, blocks)
        pieces = [piece for block in encoded for piece in block]
        lengths = np.array([len(p) for p in pieces], dtype="<u8")
        index = np.full((self.chunks_per_shard, 2), _EMPTY, dtype="<u8")
        index[: len(pieces), 0] = np.cumsum(lengths) - lengths
        index[: len(pieces), 1] = lengths
        index_bytes = index.tobytes()
        pieces.append(index_bytes + np.uint32(crc32c(index_bytes)).tobytes())
        return pieces

    def write(self, shard: int, rows: np.ndarray, pool: Executor | None = None) -> int:
        """Store shard ``shard`` (rows start at ``shard * shard_size``); returns its :func:`shard_digest`."""
        pieces = self.encode(rows, pool)
        key = self._key(shard)
        store = self.array.store_path.store
        if isinstance(store, LocalStore):
            # Straight to disk from this thread, atomically like zarr's LocalStore, without a joined copy.
            path = Path(store.root) / key
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
            with open(partial, "wb") as f:
                f.writelines(pieces)
            os.replace(partial, path)
        else:
            sync(store.set(key, default_buffer_prototype().buffer.from_bytes(b"".join(pieces))))
        return shard_digest([piece[-4:] for piece in pieces[:-1]], pieces[-1][:-4])

    def decode(self, shard: int, rows: int, complete: bool = True, digest: int | None = None) -> np.ndarray:
        """The first ``rows`` images of shard ``shard``; raises ChecksumError on any mismatch.

        The writer stores every image of a shard, so in a ``complete`` shard a missing file or
        chunk is damage; an incomplete shard reads as zeros where nothing was written. ``digest``,
        what :meth:`write` returned for this shard, is compared last, once every chunk has passed
        its own crc32c: a file whose chunks verify but whose digest differs is another shard's.
        """
        data = self._read(shard)
        out = np.zeros((rows, *self.row_shape), dtype=self.dtype)
        if data is None:
            if complete:
                raise ChecksumError("the shard is marked complete but its file is missing")
            return out
        index_size = self.chunks_per_shard * 16
        if len(data) < index_size + 4:
            raise ChecksumError(f"the shard file is truncated: {len(data)} bytes, less than its index's "
                                f"{index_size + 4}")
        index_bytes, stored_crc = data[-index_size - 4:-4], data[-4:]
        if np.uint32(crc32c(index_bytes)).tobytes() != stored_crc.tobytes():
            raise ChecksumError("shard index checksum mismatch")
        index = index_bytes.view("<u8").reshape(self.chunks_per_shard, 2)
        # Chunks are views of the file's buffer (no copy) that each decode straight into its output row.
        for i in range(rows):
            offset, length = (int(v) for v in index[i])
            if offset == _EMPTY:
                if complete:
                    raise ChecksumError(f"image {i} of a complete shard is missing")
                continue
            if offset + length > len(data) - index_size - 4 or length < 4:
                raise ChecksumError(f"image {i} of the shard lies outside the file")
            chunk = data[offset:offset + length - 4]
            if np.uint32(crc32c(chunk)).tobytes() != data[offset + length - 4:offset + length].tobytes():
                raise ChecksumError(f"checksum mismatch in image {i} of the shard")
            if self.image is not None:
                try:
                    self.image.decode_image(chunk, out[i])
                except ValueError as exc:
                    raise ChecksumError(f"image {i} of the shard is not a JPEG XL image of its row's shape "
                                        f"{self.row_shape} ({exc})") from None
                continue
            # A chunk whose checksum holds but whose header claims another size (a chunk of another array)
            # would fill the row only in part.
            size = _blosc_nbytes(chunk) if self.blosc is not None else len(chunk)
            if size != out[i].nbytes:
                raise ChecksumError(f"image {i} of the shard decodes to {size} bytes, not its row's {out[i].nbytes}")
            row = out[i].reshape(-1).view(np.uint8)
            if self.blosc is not None:
                self.blosc.decode(chunk, out=row)
            else:
                row[:] = chunk
        if digest is not None:
            checksums = [data[end - 4:end].tobytes() for end in (int(o + n) for o, n in index if o != _EMPTY)]
            if (actual := shard_digest(checksums, index_bytes.tobytes())) != digest:
                raise ChecksumError(f"the file is not the one written for this shard: its digest {actual:08x} is "
                                    f"not the {digest:08x} recorded when the shard completed (moved, swapped or "
                                    "replaced)")
        return out

    def _read(self, shard: int) -> np.ndarray | None:
        """The bytes of shard ``shard``'s file as a uint8 array (None if there is none).

        A local file is read straight into one numpy buffer (``readinto``), several times faster than
        ``read_bytes``, whose bytes object is allocated and filled anew for every shard.
        """
        key = self._key(shard)
        store = self.array.store_path.store
        if not isinstance(store, LocalStore):
            buffer = sync(store.get(key, prototype=default_buffer_prototype()))
            return None if buffer is None else np.frombuffer(buffer.to_bytes(), np.uint8)
        try:
            with open(Path(store.root) / key, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if size > self._largest_file():
                    raise ChecksumError(f"the shard file is {size} bytes, more than its {self.chunks_per_shard} "
                                        f"images could take ({self._largest_file()})")
                data = np.empty(size, np.uint8)
                view, read = memoryview(data), 0
                while read < len(data) and (count := f.readinto(view[read:])):  # one read() returns ≤ 2 GiB
                    read += count
        except FileNotFoundError:
            return None
        return data[:read]

    def _largest_file(self) -> int:
        """A bound on a valid shard file's size: every chunk at most twice its row's bytes (no codec the cache uses
        comes near; Blosc adds 16 bytes to an incompressible row, JPEG XL a few percent to noise) plus its crc32c
        and header room, and the index. Checked before the file is read, so a huge file is not allocated."""
        row = int(np.prod(self.row_shape)) * self.dtype.itemsize
        return self.chunks_per_shard * (2 * row + 1024) + self.chunks_per_shard * 16 + 4

    def _key(self, shard: int) -> str:
        return f"{self.array.path}/{self.array.metadata.encode_chunk_key((shard, *([0] * len(self.row_shape))))}"


def shard_digest(chunk_checksums: list[bytes], index: bytes) -> int:
    """What binds a shard file to its place: the crc32c of its chunks' crc32c checksums (in index order) and its index.

    Not the crc32c of the whole file: every chunk, and the index, ends with its own crc32c, and a
    crc32c over pieces that each end with their own depends only on their lengths (a CRC is
    affine), so every shard of equal chunk sizes would share it. The chunks' checksums are checked
    against their bytes on decode, so this digest still covers every byte.
    """
    return crc32c(b"".join(chunk_checksums) + index)


def _blosc_nbytes(chunk: np.ndarray) -> int:
    """The uncompressed size a Blosc chunk's 16-byte header declares (bytes 4-7, little-endian); -1 if it has none."""
    return int.from_bytes(chunk[4:8].tobytes(), "little") if len(chunk) >= 16 else -1


class ChecksumError(ValueError):
    """A shard whose stored crc32c does not match its bytes."""


class ShardLayoutError(ValueError):
    """An array whose metadata is not the shard layout the cache schema defines (the message names no array)."""


_ROWS_PER_TASK = 16
_SHUFFLE = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
