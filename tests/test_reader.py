"""The cache reader: every valid row of the complete shards once per epoch across ranks and workers, but the padding."""

import math
from collections import Counter

import numpy as np
import pytest
import torch

from invcache.cache import schema as S
from invcache.cache.reader import CacheSamples
from invcache.cache.store import Cache

# Three workers exercise uneven splits; torch warns that they exceed this machine's cores.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

# name: (images, shard size, invalid rows, shards left incomplete)
LAYOUTS = {
    # the case of the report: 5 full shards, every image valid
    "reported": (80, 16, set(), set()),
    # a short last shard, an all-invalid shard, scattered invalid rows and an incomplete shard: 25 valid rows
    "ragged": (45, 8, {2, 9, 30, 44, *range(32, 40)}, {2}),
    # fewer valid rows than ranks times workers: 2 valid rows
    "tiny": (5, 4, {0, 2, 3}, set()),
}


def image_id(row: int) -> int:
    return 1000 + row  # exact in float16, and never 0 (a row nobody wrote)


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, tuple[str, list[int]]]:
    """Each layout's location and the image ids the reader must yield, in storage order.

    Every row of every shard is written, its taps filled with its image id, so that a wrong row,
    an invalid row or a row of an incomplete shard shows in what the reader yields.
    """
    built = {}
    for name, (images, shard_size, invalid, incomplete) in LAYOUTS.items():
        location = tmp_path_factory.mktemp("cache") / name
        shapes = {"enc.0": (2, 4), "dec.1": (3, 4)} if name == "reported" else {"enc.0": (2, 4)}
        cache = Cache.create(location, num_images=images, tap_shapes=shapes, shard_size=shard_size)
        for shard in range(cache.num_shards):
            rows = range(*cache.shard_bounds(shard))
            meta = S.empty_bookkeeping(len(rows))
            meta[S.IMAGE_ID][:] = [image_id(r) for r in rows]
            meta[S.VALID][:] = [r not in invalid for r in rows]
            filled = np.array([image_id(r) for r in rows], np.float16)[:, None, None]
            cache.write_shard(shard, {tap: np.broadcast_to(filled, (len(rows), *shape)) for tap, shape in
                                      shapes.items()}, meta)
        for shard in incomplete:  # as a writer cut short before marking the shard complete leaves it
            cache.array(S.SHARD_COMPLETE)[shard] = False
        expected = [image_id(r) for r in range(images)
                    if r not in invalid and r // shard_size not in incomplete]
        built[name] = (str(location), expected)
    return built


def read_epoch(location: str, world: int, workers: int, **options) -> list[tuple[list[int], int, int]]:
    """(image ids, len(dataset), batches) of each rank, read through a real DataLoader."""
    shares = []
    for rank in range(world):
        samples = CacheSamples(location, ["enc.0"], rank=rank, world=world, buffer_size=4, **options)
        ids, batches = [], 0
        for batch in torch.utils.data.DataLoader(samples, batch_size=3, num_workers=workers):
            assert batch["enc.0"].dtype == torch.float16
            assert (batch["enc.0"] == batch[S.IMAGE_ID].view(-1, 1, 1)).all(), "a sample's taps are another row's"
            ids += batch[S.IMAGE_ID].tolist()
            batches += 1
        shares.append((ids, len(samples), batches))
    return shares


def assert_equal_shares(shares, expected: list[int], world: int) -> None:
    per_rank = math.ceil(len(expected) / world)
    for ids, length, _ in shares:
        assert len(ids) == length == per_rank
        assert len(set(ids)) == len(ids), "a rank yields a row twice"
    # per-worker counts match between ranks, so per-worker batching ends alike on every rank
    assert len({batches for _, _, batches in shares}) == 1
    counts = Counter(i for ids, _, _ in shares for i in ids)
    assert set(counts) == set(expected), "a valid row is missed, or an invalid or incomplete one read"
    repeats = sum(counts.values()) - len(expected)
    assert repeats == per_rank * world - len(expected) <= world - 1
    assert max(counts.values()) <= 2


@pytest.mark.parametrize(("layout", "world", "workers"), [
    ("ragged", 1, 0), ("ragged", 1, 3), ("ragged", 2, 0), ("ragged", 2, 1), ("ragged", 2, 3), ("ragged", 3, 0),
    ("ragged", 3, 2), ("tiny", 3, 0), ("tiny", 3, 3), ("tiny", 2, 2),
])
def test_equal_shares_read_every_valid_row_once_but_the_padding(caches, layout, world, workers):
    location, expected = caches[layout]
    shares = read_epoch(location, world, workers, seed=3, epoch=1, equal_shares=True)
    assert_equal_shares(shares, expected, world)


@pytest.mark.parametrize(("layout", "world", "workers"), [("ragged", 2, 2), ("ragged", 3, 0), ("tiny", 3, 2)])
def test_unequal_shares_read_every_valid_row_exactly_once(caches, layout, world, workers):
    location, expected = caches[layout]
    shares = read_epoch(location, world, workers, equal_shares=False)
    assert sorted(i for ids, _, _ in shares for i in ids) == expected
    assert all(len(ids) == length for ids, length, _ in shares)
    assert max(len(ids) for ids, _, _ in shares) - min(len(ids) for ids, _, _ in shares) <= 1


def test_reported_case_reads_every_row_once_with_two_ranks_of_two_workers(caches):
    location, expected = caches["reported"]
    shares = read_epoch(location, world=2, workers=2)  # equal shares: the default under DDP
    assert [len(ids) for ids, _, _ in shares] == [40, 40]
    assert sorted(shares[0][0] + shares[1][0]) == expected  # 80 rows split evenly: no padding, no repeat


def test_order_is_fixed_by_seed_and_epoch(caches):
    location, expected = caches["reported"]
    first = read_epoch(location, world=2, workers=2, seed=5, epoch=0)
    again = read_epoch(location, world=2, workers=2, seed=5, epoch=0)
    later = read_epoch(location, world=2, workers=2, seed=5, epoch=1)
    assert [ids for ids, _, _ in first] == [ids for ids, _, _ in again]
    assert all(a != b for (a, _, _), (b, _, _) in zip(first, later))
    assert sorted(later[0][0] + later[1][0]) == expected


def test_unshuffled_reads_in_storage_order_and_dec0_as_zeros(caches):
    location, expected = caches["reported"]
    samples = list(CacheSamples(location, ["dec.0", "enc.0"], shuffle=False))
    assert [s[S.IMAGE_ID] for s in samples] == expected
    assert samples[0]["dec.0"].shape == (3, 4) and samples[0]["dec.0"].dtype == torch.float16
    assert not any(s["dec.0"].any() for s in samples)


def test_rank_outside_the_world_is_refused(caches):
    with pytest.raises(ValueError, match="rank 2"):
        CacheSamples(caches["tiny"][0], ["enc.0"], rank=2, world=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_decode_threads_change_nothing_but_speed(caches, workers):
    location, _ = caches["ragged"]
    plain = read_epoch(location, 2, workers, seed=3, epoch=1)
    threaded = read_epoch(location, 2, workers, seed=3, epoch=1, decode_threads=3)
    assert threaded == plain
    with pytest.raises(ValueError, match="decode_threads must be at least 1"):
        CacheSamples(location, ["enc.0"], decode_threads=0)


def test_a_damaged_shard_decoded_in_a_thread_is_named_in_the_reader(caches, tmp_path):
    import shutil

    from invcache.cache.store import CacheCorruptError

    location = tmp_path / "copy"
    shutil.copytree(caches["reported"][0], location)
    shard_file = location / "enc" / "0" / "c" / "3" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[10] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match="shard 3"):
        list(CacheSamples(str(location), ["enc.0"], shuffle=False, decode_threads=2))
