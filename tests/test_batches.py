"""The batch reader training uses: every valid row once per epoch across ranks, the cache's values, fixed order."""

import math
import shutil
import threading
from collections import Counter

import numpy as np
import pytest
import torch
import zarr

from invcache.cache import schema as S
from invcache.cache.batches import CacheBatches
from invcache.cache.store import Cache, CacheCorruptError

# name: (images, shard size, invalid rows, shards left incomplete)
LAYOUTS = {
    "full": (80, 16, set(), set()),
    # a short last shard, an all-invalid shard, scattered invalid rows and an incomplete shard: 25 valid rows
    "ragged": (45, 8, {2, 9, 30, 44, *range(32, 40)}, {2}),
    # fewer valid rows than ranks: 2 valid rows
    "tiny": (5, 4, {0, 2, 3}, set()),
}
SHAPES = {"enc.0": (3, 4), "dec.1": (2, 4)}


def image_id(row: int) -> int:
    return 1000 + row


def row_values(row: int, shape: tuple[int, ...]) -> np.ndarray:
    """A row's values: random, but its first entry is its image id (exact in float16)."""
    values = np.random.default_rng(row).standard_normal(shape).astype(np.float16)
    values.reshape(-1)[0] = image_id(row)
    return values


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, tuple[str, list[int]]]:
    """Each layout's location and the image ids of its valid rows of complete shards, in storage order."""
    built = {}
    for name, (images, shard_size, invalid, incomplete) in LAYOUTS.items():
        location = tmp_path_factory.mktemp("cache") / name
        cache = Cache.create(location, num_images=images, tap_shapes=SHAPES, shard_size=shard_size)
        for shard in range(cache.num_shards):
            rows = range(*cache.shard_bounds(shard))
            meta = S.empty_bookkeeping(len(rows))
            meta[S.IMAGE_ID][:] = [image_id(r) for r in rows]
            meta[S.VALID][:] = [r not in invalid for r in rows]
            cache.write_shard(shard, {tap: np.stack([row_values(r, shape) for r in rows])
                                      for tap, shape in SHAPES.items()}, meta)
        for shard in incomplete:  # as a writer cut short before marking the shard complete leaves it
            cache.array(S.SHARD_COMPLETE)[shard] = False
        expected = [image_id(r) for r in range(images) if r not in invalid and r // shard_size not in incomplete]
        built[name] = (str(location), expected)
    return built


def read(location: str, taps=("enc.0",), batch_size: int = 3, **options) -> list[dict[str, torch.Tensor]]:
    """Every batch of an epoch, cloned (a batch is the reader's buffers, valid until the next one)."""
    return [{k: v.clone() for k, v in batch.items()} for batch in CacheBatches(location, list(taps), batch_size,
                                                                              **options)]


def ids_of(batches) -> list[int]:
    return [i for batch in batches for i in batch[S.IMAGE_ID].tolist()]


@pytest.mark.parametrize(("layout", "world", "window"), [
    ("full", 1, 1024), ("full", 2, 16), ("full", 3, 20), ("ragged", 1, 8), ("ragged", 2, 16), ("ragged", 3, 1),
    ("ragged", 4, 1024), ("tiny", 3, 4), ("tiny", 2, 1024),
])
def test_equal_shares_read_every_valid_row_once_but_the_padding(caches, layout, world, window):
    location, expected = caches[layout]
    shares = [read(location, rank=r, world=world, seed=3, epoch=1, shuffle_window=window) for r in range(world)]
    per_rank = math.ceil(len(expected) / world)
    assert {len(batches) for batches in shares} == {math.ceil(per_rank / 3)}, "every rank takes the same steps"
    for rank, batches in enumerate(shares):
        ids = ids_of(batches)
        assert len(ids) == len(set(ids)) == per_rank == CacheBatches(location, ["enc.0"], 3, rank=rank,
                                                                     world=world).rows
    counts = Counter(i for batches in shares for i in ids_of(batches))
    assert set(counts) == set(expected), "a valid row is missed, or an invalid or incomplete one read"
    assert sum(counts.values()) - len(expected) == per_rank * world - len(expected) <= world - 1
    assert max(counts.values()) <= 2


@pytest.mark.parametrize(("layout", "world"), [("full", 3), ("ragged", 2), ("ragged", 3), ("tiny", 3)])
def test_unequal_shares_read_every_valid_row_exactly_once(caches, layout, world):
    location, expected = caches[layout]
    shares = [ids_of(read(location, rank=r, world=world, equal_shares=False, shuffle=False)) for r in range(world)]
    assert [i for ids in shares for i in ids] == expected  # unshuffled: storage order, rank after rank
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_values_equal_the_arrays_plain_zarr_reads_and_dec0_is_zeros(caches):
    location, expected = caches["ragged"]
    group = zarr.open_group(location, mode="r")
    stored = {tap: np.asarray(group[S.array_path(tap)][:]) for tap in SHAPES}
    batches = read(location, taps=["dec.0", "enc.0", "dec.1"], batch_size=4, seed=1)
    assert sorted(ids_of(batches)) == expected
    for batch in batches:
        assert list(batch) == ["dec.0", "enc.0", "dec.1", S.IMAGE_ID]
        rows = (batch[S.IMAGE_ID] - 1000).numpy()
        for tap in SHAPES:
            np.testing.assert_array_equal(batch[tap].numpy(), stored[tap][rows])
        assert batch["dec.0"].shape == (len(rows), 2, 4) and not batch["dec.0"].any()


def test_order_is_fixed_by_seed_and_epoch(caches):
    location, expected = caches["full"]
    first = [ids_of(read(location, rank=r, world=2, seed=5, epoch=0)) for r in (0, 1)]
    again = [ids_of(read(location, rank=r, world=2, seed=5, epoch=0, decode_threads=1, prefetch=1)) for r in (0, 1)]
    later = [ids_of(read(location, rank=r, world=2, seed=5, epoch=1)) for r in (0, 1)]
    other_seed = [ids_of(read(location, rank=r, world=2, seed=6, epoch=0)) for r in (0, 1)]
    assert first == again, "decode threads and prefetch change the order"
    assert first != later and first != other_seed
    assert sorted(later[0] + later[1]) == sorted(first[0] + first[1]) == expected


def test_a_shuffle_window_mixes_whole_shards_and_a_batch_lists_its_rows_in_storage_order(caches):
    location, _ = caches["full"]  # 5 shards of 16
    order, window = CacheBatches(location, ["enc.0"], 8, seed=2, shuffle_window=32).epoch_order()
    shards = order // 16
    assert window.tolist() == [0] * 32 + [1] * 32 + [2] * 16
    for w in range(3):  # a window holds every row of its shards, shuffled
        held = order[window == w]
        whole = [r for s in sorted(set((held // 16).tolist())) for r in range(16 * s, 16 * s + 16)]
        assert sorted(held.tolist()) == whole
        assert held.tolist() != sorted(held.tolist())
    assert len(set(shards[:32].tolist())) == 2 and sorted(set(shards.tolist())) == [0, 1, 2, 3, 4]
    for batch in read(location, batch_size=8, seed=2, shuffle_window=32):
        ids = batch[S.IMAGE_ID].tolist()
        assert ids == sorted(ids)
    unshuffled = CacheBatches(location, ["enc.0"], 8, shuffle=False).epoch_order()[0]
    assert unshuffled.tolist() == list(range(80))


def test_shapes_dtypes_lengths_and_drop_last(caches):
    location, expected = caches["ragged"]  # 25 valid rows
    batches = CacheBatches(location, ["enc.0", "dec.1"], 4)
    got = list(read(location, taps=["enc.0", "dec.1"], batch_size=4))
    assert len(batches) == len(got) == 7 and batches.rows == 25 and batches.total == 25
    assert [len(b["enc.0"]) for b in got] == [4] * 6 + [1]
    assert got[0]["enc.0"].shape == (4, 3, 4) and got[0]["dec.1"].shape == (4, 2, 4)
    assert got[0]["enc.0"].dtype == got[0]["dec.1"].dtype == torch.float16
    assert got[0][S.IMAGE_ID].dtype == torch.int64
    dropped = read(location, batch_size=4, drop_last=True)
    assert len(dropped) == len(CacheBatches(location, ["enc.0"], 4, drop_last=True)) == 6
    assert all(len(b["enc.0"]) == 4 for b in dropped)
    assert ids_of(dropped) == ids_of(got)[:24]
    shares = [CacheBatches(location, ["enc.0"], 4, rank=r, world=3, drop_last=True) for r in range(3)]
    assert [len(s) for s in shares] == [2, 2, 2] and [s.rows for s in shares] == [8, 8, 8]


def test_buffers_are_preallocated_and_not_pinned_without_cuda(caches):
    location, _ = caches["full"]
    for pin in (None, True, False):
        batches = CacheBatches(location, ["enc.0"], 8, pin_memory=pin, prefetch=2)
        assert batches.pin_memory is (torch.cuda.is_available() and pin is not False)
        assert CacheBatches(location, ["enc.0"], 8, pin_memory=pin, device="cpu").pin_memory is (
            torch.cuda.is_available() and pin is True)
    batches = CacheBatches(location, ["enc.0"], 8, prefetch=2)
    storages = set()
    for batch in batches:
        assert batch["enc.0"].is_pinned() is batches.pin_memory
        storages.add(batch["enc.0"].untyped_storage().data_ptr())
    assert len(storages) == 3, "ten batches from prefetch + 1 buffers"


def test_stopping_early_ends_the_reader_thread(caches):
    location, _ = caches["full"]
    for _ in CacheBatches(location, ["enc.0"], 2, prefetch=1):
        break
    assert not [t for t in threading.enumerate() if t.name.startswith("invcache-")]


def shard_file(location, shard: int):
    return location / "enc" / "0" / "c" / str(shard) / "0" / "0"


def flip_a_byte(location) -> None:
    data = bytearray(shard_file(location, 3).read_bytes())
    data[10] ^= 0xFF
    shard_file(location, 3).write_bytes(bytes(data))


def swap_two_files(location) -> None:
    first, second = shard_file(location, 3).read_bytes(), shard_file(location, 4).read_bytes()
    shard_file(location, 3).write_bytes(second)
    shard_file(location, 4).write_bytes(first)


@pytest.mark.parametrize(("damage", "needle"), [
    (flip_a_byte, r"array enc/0 shard 3 does not verify \(ChecksumError: checksum mismatch in image 0 of the shard\)"),
    (lambda location: shard_file(location, 3).unlink(), r"array enc/0 shard 3 does not verify \(ChecksumError: the "
                                                        r"shard is marked complete but its file is missing\)"),
    (lambda location: shard_file(location, 3).write_bytes(b""), r"array enc/0 shard 3 does not verify \(ChecksumError: "
                                                                r"the shard file is truncated"),
    (swap_two_files, r"array enc/0 shard [34] does not verify \(ChecksumError: the file is not the one written for "
                     r"this shard"),  # whichever of the two is read first
])
def test_a_damaged_shard_is_named_as_every_reader_names_it(caches, tmp_path, damage, needle):
    location = tmp_path / "copy"
    shutil.copytree(caches["full"][0], location)
    damage(location)
    with pytest.raises(CacheCorruptError, match=needle):
        Cache.open(location).read_shard("enc.0", 3)
    for shuffle in (False, True):
        with pytest.raises(CacheCorruptError, match=needle):
            list(CacheBatches(str(location), ["enc.0"], 4, shuffle=shuffle, shuffle_window=16, decode_threads=2))
    assert not [t for t in threading.enumerate() if t.name.startswith("invcache-")]


def test_bad_arguments_are_refused(caches):
    location, _ = caches["tiny"]
    with pytest.raises(ValueError, match="rank 2"):
        CacheBatches(location, ["enc.0"], 4, rank=2, world=2)
    for name in ("batch_size", "decode_threads", "shuffle_window", "prefetch"):
        options = {"batch_size": 4, name: 0}
        with pytest.raises(ValueError, match=f"{name} must be at least 1"):
            CacheBatches(location, ["enc.0"], **options)


def test_the_cache_gives_its_batches(caches):
    import invcache

    location, _ = caches["ragged"]
    batches = invcache.open_cache(location).as_batches(["enc.0"], 4, seed=7, epoch=2)
    assert isinstance(batches, CacheBatches) and batches.location == location
    assert ids_of(read(location, batch_size=4, seed=7, epoch=2)) == [i for b in batches for i in b[S.IMAGE_ID].tolist()]


def test_num_workers_is_deprecated_and_ignored(tmp_path, capsys):
    from invcache.cli import main
    from invcache.errors import UsageError
    from invcache.training import TrainSettings, train

    with pytest.warns(FutureWarning, match=r"num_workers \(--num-workers\) is deprecated and ignored"), \
            pytest.raises(UsageError, match="no cache at"):
        train(TrainSettings("head-inv", cache=str(tmp_path / "none"), num_workers=2))
    with pytest.raises(SystemExit) as exit_code:
        main(["train", "head-inv", "--cache", str(tmp_path / "none"), "--num-workers", "2", "--decode-threads", "1"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]  # the display leaves a blank one
    assert exit_code.value.code == 2 and len(lines) == 2, lines
    assert lines[0].startswith("invcache: warning: --num-workers is deprecated and ignored")
    assert lines[1].startswith("invcache: error: no cache at")
