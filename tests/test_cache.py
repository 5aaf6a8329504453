"""The cache store: our whole-shard encoder writes exactly what zarr writes, and zarr reads it back."""

import numpy as np
import pytest
import zarr

from invcache.cache import schema as S
from invcache.cache.shard_codec import ShardCodec
from invcache.cache.store import Cache


def shard_file(root, path, shard, ndim):
    return (root / path / "c" / str(shard) / "/".join(["0"] * (ndim - 1))).read_bytes()


@pytest.mark.parametrize("keepbits", [None, 6])
def test_encoder_bytes_equal_zarrs_own_for_full_and_partial_shards(tmp_path, keepbits):
    rng = np.random.default_rng(0)
    shapes = {"enc.1": (6, 8), "input": (4, 5, 3)}
    ours = Cache.create(tmp_path / "ours", num_images=7, tap_shapes=shapes, shard_size=3, keepbits=keepbits)
    theirs = Cache.create(tmp_path / "theirs", num_images=7, tap_shapes=shapes, shard_size=3, keepbits=keepbits)
    data = {"enc.1": (rng.standard_normal((7, 6, 8)) + 3).astype(np.float16),
            "input": rng.integers(1, 256, (7, 4, 5, 3), dtype=np.uint8)}
    for tap, values in data.items():
        encoder = ShardCodec(ours.array(tap))
        for shard in range(3):
            start, stop = ours.shard_bounds(shard)
            encoder.write(shard, values[start:stop])
        theirs.array(tap)[:] = values
        for shard in range(3):
            path = S.array_path(tap)
            assert shard_file(tmp_path / "ours", path, shard, values.ndim) == \
                shard_file(tmp_path / "theirs", path, shard, values.ndim), (tap, shard)
        np.testing.assert_array_equal(ours.array(tap)[:], theirs.array(tap)[:])
        for shard in range(3):
            rows = slice(*ours.shard_bounds(shard))
            np.testing.assert_array_equal(ours.read_shard(tap, shard), theirs.array(tap)[rows])
    if keepbits is None:
        np.testing.assert_array_equal(ours.array("enc.1")[:], data["enc.1"])


def test_zero_rows_read_back_as_zeros(tmp_path):
    cache = Cache.create(tmp_path / "c", num_images=2, tap_shapes={"dec.1": (3, 4)}, shard_size=2)
    rows = np.zeros((2, 3, 4), np.float16)
    rows[1] = 1.5
    ShardCodec(cache.array("dec.1")).write(0, rows)
    np.testing.assert_array_equal(cache.array("dec.1")[:], rows)
    np.testing.assert_array_equal(cache.read_shard("dec.1", 0), rows)
    empty = Cache.create(tmp_path / "e", num_images=2, tap_shapes={"dec.1": (3, 4)}, shard_size=2)
    assert not empty.read_shard("dec.1", 0).any()


def test_write_shard_marks_complete_last_and_clear_shard_removes_it(tmp_path):
    cache = Cache.create(tmp_path / "c", num_images=5, tap_shapes={"enc.0": (2, 4)}, shard_size=2)
    meta = {"image_id": np.array([3, 9]), "orig_size": np.ones((2, 2), np.int32), "valid": np.array([True, False]),
            "failure": np.array(["", "missing file"], dtype=object)}
    cache.write_shard(1, {"enc.0": np.ones((2, 2, 4), np.float16)}, meta)
    assert list(cache.complete_shards()) == [False, True, False]
    assert cache.failures() == [{"image_id": 9, "reason": "missing file"}]
    cache.clear_shard(1)
    assert not cache.array("enc.0")[2:4].any()
    assert not [p for p in (tmp_path / "c" / "enc" / "0" / "c").rglob("*") if p.is_file() and "/c/1/" in str(p)]


def test_dec0_reads_as_zeros_and_open_refuses_non_caches(tmp_path):
    cache = Cache.create(tmp_path / "c", num_images=3, tap_shapes={"dec.2": (5, 4)}, shard_size=2)
    zeros = cache.read("dec.0", 0, 3)
    assert zeros.shape == (3, 5, 4) and not zeros.any()
    zarr.open_group(tmp_path / "plain", mode="w")
    from invcache.errors import InvcacheError

    with pytest.raises(InvcacheError, match="not an invcache cache"):
        Cache.open(tmp_path / "plain")
    with pytest.raises(InvcacheError, match="no cache at"):
        Cache.open(tmp_path / "nothing")
