"""How a shard file is read: raw chunks straight into their rows with vectored reads, into a reader's reused buffers,
whatever the chunks' order in the file, through short reads, and a file that shrinks while it is read is damage."""

import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from crc32c import crc32c

from invcache.cache import schema as S
from invcache.cache.batches import CacheBatches
from invcache.cache.inspect import verify_cache
from invcache.cache.shard_codec import ShardCodec
from invcache.cache.store import Cache, CacheCorruptError
from invcache.errors import UsageError

SHAPES = {"enc.1": (6, 8), "dec.1": (5, 8), "input": (4, 6, 3)}  # raw, Blosc, JPEG XL


def values_of(tap: str, rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if tap == "input":
        return rng.integers(0, 256, (rows, *SHAPES[tap]), dtype=np.uint8)
    return rng.standard_normal((rows, *SHAPES[tap])).astype(np.float16)


@pytest.fixture
def cache(tmp_path) -> Cache:
    """7 images in shards of 3, every tap written whole through the cache's own encoder."""
    cache = Cache.create(tmp_path / "c", num_images=7, tap_shapes=SHAPES, shard_size=3)
    for shard in range(cache.num_shards):
        start, stop = cache.shard_bounds(shard)
        meta = S.empty_bookkeeping(stop - start)
        meta[S.IMAGE_ID][:], meta[S.VALID][:] = np.arange(start, stop), True
        cache.write_shard(shard, {tap: values_of(tap, 7)[start:stop] for tap in SHAPES}, meta)
    assert ShardCodec(cache.array("enc.1")).blosc is None and ShardCodec(cache.array("dec.1")).blosc is not None
    return Cache.open(cache.location)


def garbage(shape, dtype) -> np.ndarray:
    out = np.empty(shape, dtype)
    out.view(np.uint8)[...] = 0xAB  # what a reused buffer holds from its last shard
    return out


@pytest.mark.parametrize("tap", list(SHAPES))
def test_a_shard_decodes_into_a_used_buffer_exactly_as_plain_zarr_reads_it(cache, tap):
    plain = zarr.open_group(cache.location, mode="r")[S.array_path(tap)]
    for shard in range(cache.num_shards):
        start, stop = cache.shard_bounds(shard)
        out = garbage((stop - start, *SHAPES[tap]), plain.dtype)
        assert cache.read_shard(tap, shard, out=out) is out
        np.testing.assert_array_equal(out, plain[start:stop])
        np.testing.assert_array_equal(out, values_of(tap, 7)[start:stop])


@pytest.mark.parametrize("tap", list(SHAPES))
def test_the_rows_an_incomplete_shard_lacks_are_zeros_in_a_used_buffer(tmp_path, tap):
    cache = Cache.create(tmp_path / "c", num_images=3, tap_shapes=SHAPES, shard_size=3)
    written = values_of(tap, 3)
    cache.array(tap)[1:2] = written[1:2]  # zarr's own write of one chunk: chunks 0 and 2 are absent
    out = garbage((3, *SHAPES[tap]), cache.array(tap).dtype)
    cache.read_shard(tap, 0, complete=False, out=out)
    assert not out[0].any() and not out[2].any()
    np.testing.assert_array_equal(out[1], written[1])


def test_raw_chunks_stored_in_another_order_are_read_by_runs(cache, tmp_path):
    """zarr's layout allows the chunks anywhere in the file; the writer's order is one run, this is three."""
    tap, codec = "enc.1", ShardCodec(cache.array("enc.1"))
    rows = values_of(tap, 7)[:3]
    pieces = codec.encode(rows)[:-1]
    order = [2, 0, 1]
    index = np.full((codec.chunks_per_shard, 2), np.iinfo(np.uint64).max, "<u8")
    offset = 0
    for chunk in order:
        index[chunk] = offset, len(pieces[chunk])
        offset += len(pieces[chunk])
    data = b"".join(pieces[c] for c in order) + index.tobytes() + np.uint32(crc32c(index.tobytes())).tobytes()
    path = tmp_path / "c" / "enc" / "1" / "c" / "0" / "0" / "0"
    path.write_bytes(data)
    np.testing.assert_array_equal(zarr.open_group(cache.location, mode="r")["enc/1"][:3], rows)
    np.testing.assert_array_equal(codec.decode(0, 3), rows)
    # the digest binds the index too, so the reordered file is not the one the writer recorded
    with pytest.raises(CacheCorruptError, match="array enc/1 shard 0 does not verify .*the file is not the one"):
        cache.read_shard(tap, 0)


def test_short_reads_are_continued(cache, monkeypatch):
    real = os.preadv
    calls = []

    def at_most_100_bytes(fd, buffers, offset):
        calls.append(len(buffers))
        left, trimmed = 100, []
        for buffer in buffers:
            if left <= 0:
                break
            trimmed.append(memoryview(buffer)[:left])
            left -= trimmed[-1].nbytes
        return real(fd, trimmed, offset)

    monkeypatch.setattr(os, "preadv", at_most_100_bytes)
    expected = values_of("enc.1", 7)
    for shard in range(cache.num_shards):
        np.testing.assert_array_equal(cache.read_shard("enc.1", shard), expected[slice(*cache.shard_bounds(shard))])
    assert len(calls) > 3 * cache.num_shards and max(calls) == 6, "one vectored read of 3 rows and their checksums"


def test_a_file_that_shrinks_while_it_is_read_is_named_as_damage(cache, monkeypatch):
    path = Path(cache.location) / "enc" / "1" / "c" / "1" / "0" / "0"
    real = os.fstat

    def then_truncated(fd):
        stat = real(fd)
        if os.path.samestat(stat, os.stat(path)):
            os.truncate(path, 100)  # another process cuts the file after the reader took its size
        return stat

    monkeypatch.setattr(os, "fstat", then_truncated)
    with pytest.raises(CacheCorruptError, match=r"array enc/1 shard 1 does not verify \(ChecksumError: the shard "
                                                r"file ended at byte \d+ while reading it"):
        cache.read_shard("enc.1", 1)


def test_out_is_checked_and_only_for_stored_taps(cache):
    with pytest.raises(ValueError, match=r"out is float16\(2, 6, 8\), not a contiguous float16\(3, 6, 8\)"):
        cache.read_shard("enc.1", 0, out=np.empty((2, 6, 8), np.float16))
    with pytest.raises(ValueError, match="not a contiguous"):
        cache.read_shard("enc.1", 0, out=np.empty((3, 8, 6), np.float16).transpose(0, 2, 1))
    for name in (S.IMAGE_ID, "dec.0"):
        with pytest.raises(UsageError, match=f"decodes into out only for a stored tap, not {name}"):
            cache.read_shard(name, 0, out=np.empty(3, np.int64))


def epochs_of(batches: CacheBatches, epochs: range) -> list[list[dict]]:
    read = []
    for epoch in epochs:
        batches.set_epoch(epoch)
        read.append([{k: v.clone() for k, v in batch.items()} for batch in batches])
    return read


def test_one_reader_for_many_epochs_reads_what_fresh_ones_read_and_keeps_its_buffers(cache):
    taps = list(SHAPES)
    kept = CacheBatches(cache.location, taps, 2, seed=5, shuffle_window=3, decode_threads=2)
    got = epochs_of(kept, range(2))
    buffers = {id(b) for spare in kept._kept.spare.values() for b in spare}
    slots = [id(slot) for slot in kept._kept.slots]
    got += epochs_of(kept, range(2, 4))
    assert {id(b) for spare in kept._kept.spare.values() for b in spare} == buffers, "no new shard buffer"
    assert [id(slot) for slot in kept._kept.slots] == slots
    for epoch, batches in enumerate(got):
        fresh = [{k: v.clone() for k, v in b.items()}
                 for b in CacheBatches(cache.location, taps, 2, seed=5, epoch=epoch, shuffle_window=3)]
        assert len(batches) == len(fresh) == 4
        for ours, theirs in zip(batches, fresh):
            assert ours.keys() == theirs.keys()
            for name in ours:
                assert ours[name].equal(theirs[name]), (epoch, name)
    ids = [[int(i) for b in batches for i in b[S.IMAGE_ID]] for batches in got]
    assert all(sorted(i) == list(range(7)) for i in ids) and len({tuple(i) for i in ids}) > 1


def test_two_iterations_of_one_reader_at_once_do_not_share_buffers(cache):
    batches = CacheBatches(cache.location, ["enc.1", "dec.1"], 2, seed=1, shuffle_window=3)
    expected = {epoch: [{k: v.clone() for k, v in b.items()} for b in
                        CacheBatches(cache.location, ["enc.1", "dec.1"], 2, seed=1, epoch=epoch, shuffle_window=3)]
                for epoch in (0, 1)}
    assert len(list(batches)) == 4  # a whole epoch first: the reader keeps its buffers for the next one
    first = iter(batches)
    got = {0: [next(first)], 1: []}
    batches.set_epoch(1)  # a generator plans its epoch when it starts: the second reads epoch 1
    second = iter(batches)
    for _ in range(3):
        got[1].append(next(second))
        got[0].append(next(first))
        for epoch in (0, 1):
            for name, tensor in got[epoch][-1].items():  # still the buffers, checked before the next batch
                assert tensor.equal(expected[epoch][len(got[epoch]) - 1][name]), (epoch, name)
    got[1].append(next(second))
    assert all(got[1][-1][k].equal(expected[1][3][k]) for k in got[1][-1])


def rewrite_index(path: Path, chunks_per_shard: int, edit) -> None:
    """Rewrite a shard file's index through ``edit(index)`` (a (chunks, 2) uint64 array), its crc32c recomputed."""
    data = path.read_bytes()
    tail = chunks_per_shard * 16 + 4
    index = np.frombuffer(data[-tail:-4], "<u8").reshape(-1, 2).copy()
    edit(index)
    path.write_bytes(data[:-tail] + index.tobytes() + np.uint32(crc32c(index.tobytes())).tobytes())


@pytest.mark.parametrize("tap", list(SHAPES))
@pytest.mark.parametrize("entry", [(1 << 63, 8), (2**64 - 2, 100), (10**6, 8)])
def test_an_index_entry_past_the_shards_rows_that_lies_outside_the_file_is_damage(cache, tap, entry):
    """The last shard holds one image of three; the digest reads the checksum of every entry the index lists."""
    path = Path(cache.location) / S.array_path(tap) / "c" / "2" / "0" / "0"
    path = path / "0" if tap == "input" else path
    rewrite_index(path, 3, lambda index: index.__setitem__(2, entry))
    with pytest.raises(CacheCorruptError, match=rf"array {S.array_path(tap)} shard 2 does not verify \(ChecksumError: "
                                                r"image 2 of the shard lies outside the file\)"):
        cache.read_shard(tap, 2)
    assert any("image 2 of the shard lies outside the file" in p for p in verify_cache(cache.location))


def test_a_blosc_chunk_whose_header_claims_more_bytes_than_it_has_is_damage(tmp_path):
    """A valid crc32c over a 16-byte Blosc header that says "memcpyed, 1 MiB": Blosc would read past the chunk."""
    cache = Cache.create(tmp_path / "c", num_images=1, tap_shapes={"dec.1": (512, 1024)}, shard_size=1)
    nbytes = 512 * 1024 * 2
    chunk = bytes([2, 1, 0x02, 2]) + nbytes.to_bytes(4, "little") * 2 + (16 + nbytes).to_bytes(4, "little")
    index = np.array([[0, len(chunk) + 4]], "<u8").tobytes()
    path = tmp_path / "c" / "dec" / "1" / "c" / "0" / "0" / "0"
    path.parent.mkdir(parents=True)
    path.write_bytes(chunk + np.uint32(crc32c(chunk)).tobytes() + index + np.uint32(crc32c(index)).tobytes())
    with pytest.raises(CacheCorruptError, match=r"array dec/1 shard 0 does not verify \(ChecksumError: image 0 of the "
                                                r"shard is 16 bytes, but its Blosc header says 1048592\)"):
        cache.read_shard("dec.1", 0, complete=False)
