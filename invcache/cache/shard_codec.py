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
speed), so :meth:`ShardCodec.decode` reads the index, checks it, and then reads the chunks
itself: compressed ones by reading the file once and decompressing each checked chunk into its
row, raw ones by vectored reads straight into their rows (and their crc32c into an array beside),
so each byte is copied once before its check.

Every chunk's crc32c still passes when a whole valid shard file sits at the wrong place (moved,
swapped with another shard's, or replaced by another cache's), so :meth:`ShardCodec.write`
returns the shard's digest (:func:`shard_digest`), which the cache records per shard, and
:meth:`ShardCodec.decode` compares it when given.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
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

    def decode(self, shard: int, rows: int, complete: bool = True, digest: int | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
        """The first ``rows`` images of shard ``shard`` (into ``out`` when given); raises ChecksumError on any mismatch.

        The writer stores every image of a shard, so in a ``complete`` shard a missing file or
        chunk is damage; an incomplete shard reads as zeros where nothing was written. ``digest``,
        what :meth:`write` returned for this shard, is compared last, once every chunk has passed
        its own crc32c: a file whose chunks verify but whose digest differs is another shard's.
        ``out``, ``(rows, *row)`` of the array's dtype, lets a reader reuse its buffers: a fresh
        buffer costs a page fault per 4 KiB on first write, about as much as the read itself.
        """
        shape = (rows, *self.row_shape)
        if out is None:
            out = np.empty(shape, dtype=self.dtype)
        elif out.shape != shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"{self.array.path}: out is {out.dtype}{out.shape}, not a contiguous {self.dtype}{shape}")
        with self._open(shard) as source:
            if source is None:
                if complete:
                    raise ChecksumError("the shard is marked complete but its file is missing")
                out[...] = 0
                return out
            index_bytes = self._index(source)
            index = index_bytes.view("<u8").reshape(self.chunks_per_shard, 2)
            present = self._present(index, rows, complete, source.size - len(index_bytes) - 4)
            out[~present] = 0
            if self.blosc is None and self.image is None:
                checksums = self._read_rows(source, index, present, out)
            else:
                checksums = self._decode_chunks(source, index, present, out)
            if digest is not None:
                # the checksums of every chunk the index lists (those past ``rows`` too), in its order, as the writer's
                listed = np.flatnonzero(index[:, 0] != _EMPTY)
                extra = [self._stored_checksum(source, index[i]) for i in listed[listed >= rows]]
                actual = shard_digest([checksums[present].tobytes(), *extra], index_bytes.tobytes())
                if actual != digest:
                    raise ChecksumError(f"the file is not the one written for this shard: its digest {actual:08x} is "
                                        f"not the {digest:08x} recorded when the shard completed (moved, swapped or "
                                        "replaced)")
        return out

    def _index(self, source: _ShardFile) -> np.ndarray:
        """The shard's (offset, length) index as bytes, its crc32c checked."""
        index_size = self.chunks_per_shard * 16
        if source.size < index_size + 4:
            raise ChecksumError(f"the shard file is truncated: {source.size} bytes, less than its index's "
                                f"{index_size + 4}")
        tail = source.read(source.size - index_size - 4, index_size + 4)
        index_bytes, stored_crc = tail[:-4], tail[-4:]
        if np.uint32(crc32c(index_bytes)).tobytes() != stored_crc.tobytes():
            raise ChecksumError("shard index checksum mismatch")
        return index_bytes

    def _present(self, index: np.ndarray, rows: int, complete: bool, data_size: int) -> np.ndarray:
        """Which of the first ``rows`` images the index lists; every listed chunk is checked to lie inside the data
        and, stored raw, each of the first ``rows`` to be its row's size."""
        offsets, lengths = index[:, 0], index[:, 1]
        listed = offsets != _EMPTY
        present = listed[:rows]
        if complete and not present.all():
            raise ChecksumError(f"image {int(np.argmin(present))} of a complete shard is missing")
        # Every entry the index lists, those past ``rows`` too (the digest reads their checksums). offset + length
        # could wrap in uint64: offset is compared with what is left after length instead.
        outside = listed & ((lengths < 4) | (lengths > data_size)
                            | (offsets > data_size - np.minimum(lengths, data_size)))
        if outside.any():
            raise ChecksumError(f"image {int(np.argmax(outside))} of the shard lies outside the file")
        lengths = lengths[:rows]
        if self.blosc is None and self.image is None:
            # A chunk whose checksum holds but whose size is another (a chunk of another array) would fill the row
            # only in part.
            row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
            wrong = present & (lengths != row_bytes + 4)
            if wrong.any():
                i = int(np.argmax(wrong))
                raise ChecksumError(f"image {i} of the shard decodes to {int(lengths[i]) - 4} bytes, not its row's "
                                    f"{row_bytes}")
        return present

    def _read_rows(self, source: _ShardFile, index: np.ndarray, present: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Chunks stored without a compressor, read straight into their rows (their crc32c beside), then checked.

        Consecutive chunks (the writer stores them so) come in one vectored read, so each byte is copied once,
        from the page cache into its row."""
        checksums = np.zeros(len(out), "<u4")
        rows = out.reshape(len(out), -1).view(np.uint8)
        run: list[memoryview] = []
        run_start = run_end = -1
        for i in np.flatnonzero(present).tolist():
            offset, length = int(index[i, 0]), int(index[i, 1])
            if offset != run_end or len(run) >= _IOV_MAX - 1:
                source.read_into(run, run_start)
                run, run_start = [], offset
            run += [memoryview(rows[i]), memoryview(checksums[i:i + 1]).cast("B")]
            run_end = offset + length
        source.read_into(run, run_start)
        for i in np.flatnonzero(present).tolist():
            if crc32c(rows[i]) != checksums[i]:
                raise ChecksumError(f"checksum mismatch in image {i} of the shard")
        return checksums

    def _decode_chunks(self, source: _ShardFile, index: np.ndarray, present: np.ndarray,
                       out: np.ndarray) -> np.ndarray:
        """Compressed chunks: the file read once, each chunk checked and decoded straight into its row."""
        data = source.read(0, source.size)
        checksums = np.zeros(len(out), "<u4")
        for i in np.flatnonzero(present).tolist():
            offset, length = int(index[i, 0]), int(index[i, 1])
            chunk = data[offset:offset + length - 4]
            checksums[i] = data[offset + length - 4:offset + length].view("<u4")[0]
            if crc32c(chunk) != checksums[i]:
                raise ChecksumError(f"checksum mismatch in image {i} of the shard")
            if self.image is not None:
                try:
                    self.image.decode_image(chunk, out[i])
                except ValueError as exc:
                    raise ChecksumError(f"image {i} of the shard is not a JPEG XL image of its row's shape "
                                        f"{self.row_shape} ({exc})") from None
                continue
            size, stored = _blosc_sizes(chunk)
            if size != out[i].nbytes:
                raise ChecksumError(f"image {i} of the shard decodes to {size} bytes, not its row's {out[i].nbytes}")
            if stored != len(chunk):  # Blosc would read as many bytes as its header says, past the chunk
                raise ChecksumError(f"image {i} of the shard is {len(chunk)} bytes, but its Blosc header says {stored}")
            self.blosc.decode(chunk, out=out[i].reshape(-1).view(np.uint8))
        return checksums

    @staticmethod
    def _stored_checksum(source: _ShardFile, entry: np.ndarray) -> bytes:
        offset, length = int(entry[0]), int(entry[1])
        return source.read(offset + length - 4, 4).tobytes() if length >= 4 else b""

    @contextmanager
    def _open(self, shard: int) -> Iterator[_ShardFile | None]:
        """Shard ``shard``'s file (None if there is none): a local file is read in place with ``pread``, another
        store's is fetched whole."""
        key = self._key(shard)
        store = self.array.store_path.store
        if not isinstance(store, LocalStore):
            buffer = sync(store.get(key, prototype=default_buffer_prototype()))
            yield None if buffer is None else _ShardFile(np.frombuffer(buffer.to_bytes(), np.uint8))
            return
        try:
            fd = os.open(Path(store.root) / key, os.O_RDONLY)
        except FileNotFoundError:
            yield None
            return
        try:
            size = os.fstat(fd).st_size
            if size > self._largest_file():
                raise ChecksumError(f"the shard file is {size} bytes, more than its {self.chunks_per_shard} "
                                    f"images could take ({self._largest_file()})")
            yield _ShardFile(size=size, fd=fd)
        finally:
            os.close(fd)

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


def _blosc_sizes(chunk: np.ndarray) -> tuple[int, int]:
    """The uncompressed and compressed sizes a Blosc chunk's 16-byte header declares (bytes 4-7 and 12-15,
    little-endian); -1 for both if it has none."""
    if len(chunk) < 16:
        return -1, -1
    return int.from_bytes(chunk[4:8].tobytes(), "little"), int.from_bytes(chunk[12:16].tobytes(), "little")


class ChecksumError(ValueError):
    """A shard whose stored crc32c does not match its bytes."""


class ShardLayoutError(ValueError):
    """An array whose metadata is not the shard layout the cache schema defines (the message names no array)."""


class _ShardFile:
    """A shard file's bytes, read by position: an open local file (``fd``, never read past ``size``) or bytes in
    memory. A read that comes back short (the file shrank under the reader) is damage, not zeros."""

    def __init__(self, data: np.ndarray | None = None, *, size: int | None = None, fd: int | None = None) -> None:
        self.data, self.fd = data, fd
        self.size = len(data) if data is not None else size

    def read(self, offset: int, length: int) -> np.ndarray:
        if self.data is not None:
            return self.data[offset:offset + length]
        out = np.empty(length, np.uint8)
        self.read_into([memoryview(out)], offset)
        return out

    def read_into(self, buffers: list[memoryview], offset: int) -> None:
        """Fill ``buffers`` with the bytes from ``offset`` on (a vectored read, at most ``_IOV_MAX`` buffers)."""
        wanted = sum(b.nbytes for b in buffers)
        if self.data is not None:
            for buffer in buffers:
                np.frombuffer(buffer, np.uint8)[:] = self.data[offset:offset + buffer.nbytes]
                offset += buffer.nbytes
            return
        done = 0
        while done < wanted:  # one call returns at most 2 GiB, and a signal may cut it short
            count = os.preadv(self.fd, _skip(buffers, done), offset + done)
            if not count:
                raise ChecksumError(f"the shard file ended at byte {offset + done} while reading it (it shrank: "
                                    "written while being read?)")
            done += count


def _skip(buffers: list[memoryview], count: int) -> list[memoryview]:
    """``buffers`` without their first ``count`` bytes."""
    for i, buffer in enumerate(buffers):
        if count < buffer.nbytes:
            return [buffer[count:], *buffers[i + 1:]]
        count -= buffer.nbytes
    return []


_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
_ROWS_PER_TASK = 16
_SHUFFLE = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
