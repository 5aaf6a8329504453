"""The cache store: our whole-shard encoder writes exactly what zarr writes, and zarr reads it back;
damage (and only damage) is reported as corruption; no process-wide warning filters."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import zarr

from invcache.cache import schema as S
from invcache.cache.inspect import verify_cache
from invcache.cache.shard_codec import ShardCodec
from invcache.cache.store import Cache, CacheCorruptError
from invcache.errors import InvcacheError, UsageError


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
    with pytest.raises(InvcacheError, match="not an invcache cache"):
        Cache.open(tmp_path / "plain")
    with pytest.raises(InvcacheError, match="no cache at"):
        Cache.open(tmp_path / "nothing")


def written_cache(location, keepbits=None) -> Cache:
    cache = Cache.create(location, num_images=4, tap_shapes={"enc.1": (2, 4)}, shard_size=2, keepbits=keepbits)
    for shard in range(2):
        meta = S.empty_bookkeeping(2)
        meta[S.VALID][:] = True
        cache.write_shard(shard, {"enc.1": np.full((2, 2, 4), shard + 1.5, np.float16)}, meta)
    return cache


def flip_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damage_is_named_in_tap_bookkeeping_and_completion_arrays(tmp_path):
    written_cache(tmp_path / "c")
    flip_byte(tmp_path / "c" / "enc" / "1" / "c" / "1" / "0" / "0")
    flip_byte(tmp_path / "c" / "valid" / "c" / "0")
    flip_byte(tmp_path / "c" / "shard_complete" / "c" / "0")
    cache = Cache.open(tmp_path / "c")
    for read, named in [(lambda: cache.read_shard("enc.1", 1), "enc/1 shard 1"),
                        (lambda: cache.read("enc.1", 2, 4), "enc/1 shard 1"),
                        (lambda: cache.read_shard("valid", 0), "valid shard 0"),
                        (cache.complete_shards, "shard_complete shard 0-1")]:
        with pytest.raises(CacheCorruptError, match=f"array {named} does not verify"):
            read()
    problems = verify_cache(str(tmp_path / "c"))
    assert sorted(p.split("array ")[1].split(" does not")[0] for p in problems) == \
        ["enc/1 shard 1", "shard_complete shard 0", "valid shard 0"]


def test_errors_other_than_damage_are_not_reported_as_corruption(tmp_path, monkeypatch):
    cache = written_cache(tmp_path / "c")
    with pytest.raises(UsageError, match="shards 0 to 1, not 5"):
        cache.read_shard("enc.1", 5)
    with pytest.raises(TypeError):
        cache.read("enc.1", 0.5, 2)

    def bug(*args, **kwargs):
        raise ValueError("a bad argument")

    monkeypatch.setattr(ShardCodec, "decode", bug)
    with pytest.raises(ValueError, match="a bad argument") as raised:
        Cache.open(tmp_path / "c").read_shard("enc.1", 0)
    assert not isinstance(raised.value, CacheCorruptError)
    with pytest.raises(ValueError, match="a bad argument"):
        verify_cache(str(tmp_path / "c"))


def test_importing_the_cache_leaves_the_warning_filters_alone():
    # What invcache.cache imports from elsewhere (numpy, numcodecs, ...) may install filters of its own:
    # import all of it first, so only invcache's own modules are measured.
    listed = subprocess.run([sys.executable, "-c", "import sys, invcache.cache; "
                             "print(' '.join(m for m in sys.modules if m.split('.')[0] != 'invcache'))"],
                            capture_output=True, text=True, check=True).stdout.split()
    script = (
        "import importlib, warnings\n"
        f"for name in {listed!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        pass  # an alias in sys.modules (e.g. os.path's) that is not importable by its name\n"
        "before = list(warnings.filters)\n"
        "import invcache.cache, invcache.cache.inspect\n"
        "assert warnings.filters == before, [f for f in warnings.filters if f not in before]\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_keepbits_cache_is_created_and_read_without_the_numcodecs_warning(tmp_path):
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written_cache(tmp_path / "c", keepbits=6)
        cache = Cache.open(tmp_path / "c")
        assert cache["enc.1"][3].shape == (2, 4) and cache.read("enc.1", 0, 4).shape == (4, 2, 4)
    assert not [w for w in caught if "Numcodecs codecs" in str(w.message)], [str(w.message) for w in caught]
    assert warnings.filters == before


def test_a_chunk_of_another_size_with_a_valid_checksum_is_damage_not_a_partial_row(tmp_path):
    # a shard file of an array with smaller rows: every chunk's crc32c and the index hold, the sizes do not
    cache = Cache.create(tmp_path / "c", num_images=2, tap_shapes={"dec.1": (3, 4)}, shard_size=2)
    other = Cache.create(tmp_path / "o", num_images=2, tap_shapes={"dec.1": (2, 4)}, shard_size=2)
    ShardCodec(cache.array("dec.1")).write(0, np.ones((2, 3, 4), np.float16))
    ShardCodec(other.array("dec.1")).write(0, np.full((2, 2, 4), 7, np.float16))
    target = tmp_path / "c" / "dec" / "1" / "c" / "0" / "0" / "0"
    target.write_bytes((tmp_path / "o" / "dec" / "1" / "c" / "0" / "0" / "0").read_bytes())
    with pytest.raises(CacheCorruptError, match=r"image 0 of the shard decodes to 16 bytes, not its row's 24"):
        cache.decode_shard("dec.1", 0, complete=True, digest=None)


def test_encoder_taps_are_stored_without_a_compressor_and_plain_zarr_reads_every_tap(tmp_path):
    shapes = {"enc.1": (6, 8), "dec.1": (6, 8), "head.boxes": (6, 4), "input": (4, 5, 3)}
    rng = np.random.default_rng(1)
    data = {"enc.1": rng.standard_normal((3, 6, 8)).astype(np.float16),
            "dec.1": rng.standard_normal((3, 6, 8)).astype(np.float16),
            "head.boxes": rng.random((3, 6, 4)).astype(np.float16),
            "input": rng.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)}
    cache = Cache.create(tmp_path / "c", num_images=3, tap_shapes=shapes, shard_size=2)
    assert cache.attrs["codec"]["uncompressed"] == ["enc.*"]  # the default of a cache created without data
    kinds = {tap: [type(c).__name__ for c in (cache.array(tap).serializer, *cache.array(tap).compressors)]
             for tap in shapes}
    assert kinds == {"enc.1": ["BytesCodec", "Crc32cCodec"], "dec.1": ["BytesCodec", "BloscCodec", "Crc32cCodec"],
                     "head.boxes": ["BytesCodec", "BloscCodec", "Crc32cCodec"], "input": ["JpegXlCodec", "Crc32cCodec"]}
    for tap, values in data.items():
        for shard in range(2):
            ShardCodec(cache.array(tap)).write(shard, values[slice(*cache.shard_bounds(shard))])
    # the stored chunk of an uncompressed tap is the row's bytes and their crc32c
    stored = shard_file(tmp_path / "c", "enc/1", 0, 3)
    assert stored[:data["enc.1"][0].nbytes] == data["enc.1"][0].tobytes()
    plain = zarr.open_group(tmp_path / "c", mode="r")
    for tap, values in data.items():
        np.testing.assert_array_equal(plain[S.array_path(tap)][:], values)
        np.testing.assert_array_equal(np.concatenate([cache.read_shard(tap, s) for s in range(2)]), values)
    lossy = Cache.create(tmp_path / "lossy", num_images=3, tap_shapes=shapes, shard_size=2, keepbits=6)
    assert lossy.attrs["codec"]["uncompressed"] == []
    assert [type(c).__name__ for c in lossy.array("enc.1").compressors] == ["BloscCodec", "Crc32cCodec"]
    assert type(lossy.array("input").serializer).__name__ == "JpegXlCodec" and not lossy.array("input").filters


def test_a_cache_made_before_per_tap_codecs_still_opens_and_verifies(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:  # every tap compressed, bit-shuffled in Blosc's blocks, as caches were made
        patch.setattr(S, "UNCOMPRESSED", ())
        patch.setattr(S, "BLOSC_SHUFFLE", "bitshuffle")
        patch.setattr(S, "BLOSC_BLOCKSIZE", 0)
        cache = Cache.create(tmp_path / "old", num_images=2, tap_shapes={"enc.1": (6, 8)}, shard_size=2)
    group = zarr.open_group(tmp_path / "old", mode="r+")
    group.attrs["codec"] = {k: v for k, v in group.attrs["codec"].items()
                            if k not in ("uncompressed", "input", "blocksize")}
    assert group.attrs["codec"]["shuffle"] == "bitshuffle"
    assert cache.array("enc.1").compressors[0].shuffle.value == "bitshuffle"
    rows = np.ones((2, 6, 8), np.float16)
    meta = S.empty_bookkeeping(2)
    meta[S.IMAGE_ID][:], meta[S.VALID][:] = [1, 2], True
    cache.write_shard(0, {"enc.1": rows}, meta)
    reopened = Cache.open(str(tmp_path / "old"))
    assert [type(c).__name__ for c in reopened.array("enc.1").compressors] == ["BloscCodec", "Crc32cCodec"]
    np.testing.assert_array_equal(reopened.read_shard("enc.1", 0), rows)
    assert verify_cache(str(tmp_path / "old")) == []


def test_image_sums_are_exact_across_the_uint16_blocks_and_skip_invalid_rows():
    rng = np.random.default_rng(0)
    for rows in (1, 257, 258, 600):  # 257 rows of 255 fill a uint16 exactly; more need a second block
        images = rng.integers(250, 256, (rows, 4, 5, 3), dtype=np.uint8)
        valid = rng.random(rows) < 0.8
        np.testing.assert_array_equal(S.sum_images(images, valid), images[valid].astype(np.uint64).sum(axis=0))
        np.testing.assert_array_equal(S.sum_images(images, np.ones(rows, bool)),
                                      images.astype(np.uint64).sum(axis=0))
    assert S.sum_images(np.full((600, 2, 2, 3), 255, np.uint8), np.ones(600, bool)).max() == 600 * 255
