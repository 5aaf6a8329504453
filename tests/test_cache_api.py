"""The cache as the Python API shows it (SPEC §9): open_cache, lazy tap views, the mean image, labelled arrays."""

import shutil

import numpy as np
import pytest
import torch
import zarr

import invcache
from invcache.cache import schema as S
from invcache.cache.inspect import cache_info, verify_cache
from invcache.cache.reader import CacheSamples
from invcache.cache.store import Cache, CacheCorruptError
from invcache.errors import InvcacheError, UsageError

SHAPES = {"input": (4, 5, 3), "enc.1": (4, 8), "dec.2": (5, 4)}
NUM_IMAGES, SHARD_SIZE = 7, 3  # three shards, the last one short
INVALID = [1, 5]


def fill(cache: Cache, shards, seed: int = 0) -> dict[str, np.ndarray]:
    """Write ``shards`` with random rows (invalid rows too: the mean must leave them out); return every row."""
    rng = np.random.default_rng(seed)
    data = {"input": rng.integers(0, 256, (NUM_IMAGES, *SHAPES["input"]), dtype=np.uint8),
            "enc.1": rng.standard_normal((NUM_IMAGES, *SHAPES["enc.1"])).astype(np.float16),
            "dec.2": rng.standard_normal((NUM_IMAGES, *SHAPES["dec.2"])).astype(np.float16)}
    for shard in shards:
        start, stop = cache.shard_bounds(shard)
        meta = S.empty_bookkeeping(stop - start)
        meta[S.IMAGE_ID][:] = [100 + 10 * r for r in range(start, stop)]
        meta[S.VALID][:] = [r not in INVALID for r in range(start, stop)]
        cache.write_shard(shard, {tap: data[tap][start:stop] for tap in cache.taps}, meta)
    return data


@pytest.fixture
def written(tmp_path):
    cache = Cache.create(tmp_path / "c", num_images=NUM_IMAGES, tap_shapes=SHAPES, shard_size=SHARD_SIZE)
    return tmp_path / "c", fill(cache, range(cache.num_shards))


def test_open_cache_gives_taps_attrs_length_and_bookkeeping(written):
    location, _ = written
    cache = invcache.open_cache(location)
    assert isinstance(cache, invcache.Cache)
    assert cache.taps == list(SHAPES) and cache.attrs["shard_size"] == SHARD_SIZE and len(cache) == NUM_IMAGES
    assert cache.image_ids.dtype == np.int64 and list(cache.image_ids) == [100 + 10 * r for r in range(NUM_IMAGES)]
    assert cache.valid.dtype == bool and list(np.flatnonzero(~cache.valid)) == INVALID
    assert "enc.1" in cache and "dec.0" in cache and "enc.2" not in cache


@pytest.mark.parametrize("key", [
    3, -1, np.int64(6), slice(None), slice(1, 6, 2), slice(None, None, -2), slice(5, 2), [5, 0, 5, -2],
    np.array([6, 2, 3]), np.array([[0, 4], [6, 6]]), [], np.arange(NUM_IMAGES) % 3 == 0,
    (slice(2, 5), 0), (4, slice(1, 3), 2), (..., 1), Ellipsis,
])
def test_a_tap_view_indexes_like_the_numpy_array(written, key):
    location, data = written
    cache = invcache.open_cache(location)
    for tap in SHAPES:
        view = cache[tap]
        expected = data[tap][key]
        got = view[key]
        assert isinstance(got, np.ndarray) and got.dtype == data[tap].dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
        tensor = view.torch[key]
        assert isinstance(tensor, torch.Tensor) and tensor.shape == expected.shape
        np.testing.assert_array_equal(tensor.numpy(), expected)


def test_a_view_has_shape_dtype_length_and_converts_to_numpy(written):
    location, data = written
    view = invcache.open_cache(location)["input"]
    assert view.shape == (NUM_IMAGES, *SHAPES["input"]) and view.dtype == np.uint8 and len(view) == NUM_IMAGES
    np.testing.assert_array_equal(np.asarray(view), data["input"])
    np.testing.assert_array_equal(np.stack(list(view)), data["input"])
    assert np.asarray(view, dtype=np.float32).dtype == np.float32


def test_a_view_decodes_each_needed_shard_once_per_call(written):
    location, data = written
    cache = invcache.open_cache(location)
    calls = []
    read_shard = cache.read_shard
    cache.read_shard = lambda name, shard, *a, **k: calls.append((name, shard)) or read_shard(name, shard, *a, **k)
    rows = [6, 0, 2, 6, 1, 0]
    np.testing.assert_array_equal(cache["enc.1"][rows], data["enc.1"][rows])
    assert sorted(calls) == [("enc.1", 0), ("enc.1", 2)]


def test_out_of_range_rows_and_bad_masks_are_index_errors(written):
    view = invcache.open_cache(written[0])["enc.1"]
    for key in (NUM_IMAGES, -NUM_IMAGES - 1, [0, NUM_IMAGES], np.ones(NUM_IMAGES + 1, bool)):
        with pytest.raises(IndexError):
            view[key]
    with pytest.raises(IndexError, match="int, slice"):
        view[[0.5, 1.5]]


def test_dec0_is_a_view_of_zeros_with_the_decoder_taps_shape(written):
    view = invcache.open_cache(written[0])["dec.0"]
    assert view.shape == (NUM_IMAGES, *SHAPES["dec.2"]) and view.dtype == np.float16
    rows = view[[0, 6]]
    assert rows.shape == (2, *SHAPES["dec.2"]) and not rows.any()
    assert view.torch[2:4].shape == (2, *SHAPES["dec.2"])


def test_an_unknown_tap_is_a_usage_error_listing_the_taps(written):
    cache = invcache.open_cache(written[0])
    for key in ("enc.4", "image_id", 0):
        with pytest.raises(UsageError, match="its taps: input, enc.1, dec.2"):
            cache[key]


def test_an_incomplete_shard_reads_as_zeros_where_unwritten_and_a_complete_ones_missing_file_is_named(tmp_path):
    cache = Cache.create(tmp_path / "c", num_images=NUM_IMAGES, tap_shapes=SHAPES, shard_size=SHARD_SIZE)
    data = fill(cache, [0, 2])
    view = invcache.open_cache(tmp_path / "c")["enc.1"]
    got = view[:]
    np.testing.assert_array_equal(got[:3], data["enc.1"][:3])
    np.testing.assert_array_equal(got[6:], data["enc.1"][6:])
    assert not got[3:6].any()
    (tmp_path / "c" / "enc" / "1" / "c" / "2" / "0" / "0").unlink()
    with pytest.raises(CacheCorruptError, match=r"enc/1 shard 2 does not verify .*missing"):
        view[6]


def test_as_dataset_is_the_training_dataset_over_the_cache(written):
    location, _ = written
    dataset = invcache.open_cache(location).as_dataset(["enc.1"], shuffle=False)
    assert isinstance(dataset, CacheSamples) and dataset.location == str(location)


def test_the_mean_image_is_the_mean_of_the_valid_inputs(written):
    location, data = written
    cache = Cache.open(location, mode="r+")
    total, count = cache.sum_valid_input(range(cache.num_shards))
    assert total.dtype == np.uint64 and count == NUM_IMAGES - len(INVALID)
    first, rest = cache.sum_valid_input([0]), cache.sum_valid_input([1, 2])
    np.testing.assert_array_equal(first[0] + rest[0], total)
    assert first[1] + rest[1] == count
    cache.write_mean_image(total, count)
    cache.write_mean_image(total, count)  # idempotent

    valid = np.ones(NUM_IMAGES, bool)
    valid[INVALID] = False
    expected = np.mean(data["input"][valid], axis=0)
    mean = invcache.open_cache(location).mean_image
    assert mean.dtype == np.float64 and mean.shape == SHAPES["input"] and 0 <= mean.min() and mean.max() <= 1
    np.testing.assert_allclose(mean * 255, expected, rtol=1e-12, atol=0)
    assert zarr.open_group(location, mode="r")[S.MEAN_IMAGE].attrs[S.MEAN_IMAGE_COUNT] == count
    assert "mean_image" in [a["name"] for a in cache_info(str(location))["arrays"]]

    cache.write_mean_image(np.full(SHAPES["input"], 255, np.uint64), 1)  # replaces the earlier one
    assert (invcache.open_cache(location).mean_image == 1).all()
    with pytest.raises(UsageError, match="at least one image"):
        cache.write_mean_image(total, 0)


def test_a_flipped_byte_in_the_mean_image_is_named_by_verify(written):
    location, _ = written
    cache = Cache.open(location, mode="r+")
    cache.write_mean_image(*cache.sum_valid_input(range(cache.num_shards)))
    assert verify_cache(str(location)) == []
    chunk = location / S.MEAN_IMAGE / "c" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    problems = verify_cache(str(location))
    assert len(problems) == 1 and "array mean_image does not verify" in problems[0]
    with pytest.raises(CacheCorruptError, match="mean_image"):
        invcache.open_cache(location).mean_image


def test_a_missing_mean_image_says_why(tmp_path):
    no_input = Cache.create(tmp_path / "a", num_images=2, tap_shapes={"enc.0": (2, 4)}, shard_size=2)
    with pytest.raises(InvcacheError, match="has no mean image: it has no input tap"):
        no_input.mean_image
    cache = Cache.create(tmp_path / "b", num_images=NUM_IMAGES, tap_shapes=SHAPES, shard_size=SHARD_SIZE)
    fill(cache, [0, 1])
    with pytest.raises(InvcacheError, match=r"extraction has not finished \(2 of 3 shards complete\)"):
        invcache.open_cache(tmp_path / "b").mean_image
    fill(cache, [2])
    shutil.copytree(tmp_path / "b", tmp_path / "cut")
    with pytest.raises(InvcacheError, match="did not write one"):
        invcache.open_cache(tmp_path / "b").mean_image
    # a write cut short before its count (written last) is not read as the mean
    cut = Cache.open(tmp_path / "cut", mode="r+")
    cut.write_mean_image(*cut.sum_valid_input(range(cut.num_shards)))
    del cut.array(S.MEAN_IMAGE).attrs[S.MEAN_IMAGE_COUNT]
    assert not invcache.open_cache(tmp_path / "cut").has_mean_image()


def test_every_array_names_its_dimensions_and_content_for_plain_zarr(tmp_path):
    shapes = {"input": (4, 5, 3), "backbone.c5": (2, 6), "enc.0": (2, 4), "enc.3": (2, 4), "dec.1": (3, 4),
              "head.logits": (3, 5), "head.boxes": (3, 4)}
    cache = Cache.create(tmp_path / "c", num_images=3, tap_shapes=shapes, shard_size=2)
    cache.write_mean_image(np.zeros(shapes["input"], np.uint64), 1)
    group = zarr.open_group(tmp_path / "c", mode="r")
    expected = {
        "input": ("image", "y", "x", "rgb"), "enc/3": ("image", "token", "channel"),
        "head/boxes": ("image", "token", "channel"), "image_id": ("image",), "valid": ("image",),
        "failure": ("image",), "orig_size": ("image", "hw"), "shard_complete": ("shard",),
        "mean_image": ("y", "x", "rgb"),
    }
    for path, dims in expected.items():
        assert group[path].metadata.dimension_names == dims, path
    for tap in shapes:
        attrs = group[S.array_path(tap)].attrs
        assert attrs["tap"] == tap and attrs["description"], tap
    assert group["enc/3"].attrs["description"] == "output of encoder layer 3"
    assert "encoder input" in group["enc/0"].attrs["description"]
    assert "after the decoder's final LayerNorm" in group["dec/1"].attrs["description"]
    assert all(group[name].attrs["description"] for name in [*S.PER_IMAGE_ARRAYS, S.SHARD_COMPLETE, S.MEAN_IMAGE])
