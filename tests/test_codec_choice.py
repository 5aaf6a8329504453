"""Per-cache codec choice: taps Blosc shrinks by less than about 1.1x are stored raw, as measured on the first batch."""

import numpy as np
import pytest
import torch
import zarr
from numcodecs import Blosc

from invcache.cache import schema as S
from invcache.cache.codec_choice import blosc_ratios, choose_uncompressed
from invcache.cache.inspect import verify_cache
from invcache.cache.shard_codec import ShardCodec
from invcache.cache.store import Cache


def rows_like_detr(rng):
    """LayerNorm'd fp16 noise (incompressible), equal queries and mostly empty boxes (compressible)."""
    query = rng.standard_normal((1, 1, 16))
    return {"enc.1": rng.standard_normal((4, 30, 16)).astype(np.float16),
            "dec.1": np.repeat(query, 10, axis=1).repeat(4, axis=0).astype(np.float16),
            "head.boxes": np.pad(rng.random((4, 5, 4)), ((0, 0), (0, 95), (0, 0))).astype(np.float16),
            "input": rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)}


def test_the_ratio_is_raw_over_the_bytes_the_cache_writes_one_chunk_per_image_and_the_threshold_decides(tmp_path):
    rows = rows_like_detr(np.random.default_rng(0))
    ratios = blosc_ratios(rows)
    # what a cache that compresses every tap actually stores for these rows: each chunk less its crc32c
    shapes = {tap: values.shape[1:] for tap, values in rows.items() if tap != "input"}
    cache = Cache.create(tmp_path / "c", num_images=4, tap_shapes=shapes, shard_size=4, uncompressed=[])
    for tap in shapes:
        stored = ShardCodec(cache.array(tap)).encode(rows[tap])[:-1]
        assert abs(ratios[tap] - rows[tap].nbytes / sum(len(chunk) - 4 for chunk in stored)) < 1e-12, tap
    # shuffled by 2-byte elements as the cache does (on rows large enough for Blosc to try, as DETR-R50's):
    # LayerNorm'd noise gains from its high bytes (sign, exponent) kept apart from its low ones, more than
    # from the bytes unshuffled or bit-shuffled in Blosc's own blocks (earlier versions' codec)
    noise = np.random.default_rng(2).standard_normal((2, 300, 256)).astype(np.float16)
    ours = blosc_ratios({"enc.2": noise})["enc.2"]

    def ratio(blosc, as_bytes=False):
        return noise.nbytes / sum(len(blosc.encode(row.tobytes() if as_bytes else row)) for row in noise)

    assert ours == pytest.approx(ratio(Blosc("zstd", 1, Blosc.SHUFFLE, blocksize=1 << 20)), abs=1e-12)
    assert ours > 1.1 > ratio(Blosc("zstd", 1, Blosc.SHUFFLE, blocksize=1 << 20), as_bytes=True)
    assert ours > 1.1 > ratio(Blosc("zstd", 1, Blosc.BITSHUFFLE))
    assert "input" not in ratios  # stored with the image codec, never Blosc
    assert ratios["enc.1"] < S.COMPRESSION_WORTHWHILE < ratios["dec.1"]
    assert choose_uncompressed(rows) == ["enc.1"]


def test_a_cache_created_with_a_measured_choice_stores_exactly_those_taps_raw(tmp_path):
    rows = rows_like_detr(np.random.default_rng(1))
    shapes = {tap: values.shape[1:] for tap, values in rows.items()}
    cache = Cache.create(tmp_path / "c", num_images=4, tap_shapes=shapes, shard_size=4,
                         uncompressed=choose_uncompressed(rows))
    assert cache.attrs["codec"]["uncompressed"] == ["enc.1"]
    kinds = {tap: type(cache.array(tap).compressors[0]).__name__ for tap in shapes}
    assert kinds == {"enc.1": "Crc32cCodec", "dec.1": "BloscCodec", "head.boxes": "BloscCodec", "input": "Crc32cCodec"}
    meta = S.empty_bookkeeping(4)
    meta[S.IMAGE_ID][:], meta[S.VALID][:] = [1, 2, 3, 4], True
    cache.write_shard(0, rows, meta)
    assert ShardCodec(cache.array("dec.1")).blosc is not None
    plain = zarr.open_group(tmp_path / "c", mode="r")
    for tap, values in rows.items():
        np.testing.assert_array_equal(plain[S.array_path(tap)][:], values)
    assert verify_cache(str(tmp_path / "c")) == []


def test_codec_records_with_measured_lists_are_valid_and_edited_ones_are_not():
    assert S.is_codec_record(S.codec_record(None, ["enc.3", "dec.6", "head.logits"]))
    assert S.is_codec_record(S.codec_record(None, []))
    assert S.codec_record(4)["uncompressed"] == []  # --keepbits: every tap compressed
    assert S.is_codec_record({**S.codec_record(None), "uncompressed": ["enc.*", "dec.*", "head.logits"]})  # earlier
    # records of caches made before the byte shuffle: bit-shuffled, no block size, with or without the later keys
    earlier = {k: v for k, v in S.codec_record(None, ["enc.*"]).items() if k != "blocksize"} | {"shuffle": "bitshuffle"}
    assert S.is_codec_record(earlier) and S.is_codec_record({k: v for k, v in earlier.items() if k != "input"})
    assert not S.is_codec_record({**S.codec_record(None), "shuffle": "bitshuffle"}), "a block size is byte shuffle's"
    assert not S.is_codec_record({k: v for k, v in S.codec_record(None).items() if k != "blocksize"})
    # equal to Python but not the record the cache writes: a float block size, a boolean level
    assert not S.is_codec_record({**S.codec_record(None), "blocksize": float(S.BLOSC_BLOCKSIZE)})
    assert not S.is_codec_record({**S.codec_record(None), "clevel": True})
    for bad in (["enc.1", "enc.1"], ["../x"], ["input"], [3], "enc.*", ["enc.1" + "0" * 20]):
        record = {**S.codec_record(None), "uncompressed": bad}
        assert not S.is_codec_record(record), bad
        with pytest.raises(ValueError, match="is not a list of distinct float taps"):
            Cache.create("memory://x", num_images=1, tap_shapes={"enc.1": (2, 2)}, uncompressed=bad)
    assert not S.is_codec_record({**S.codec_record(6), "uncompressed": ["enc.1"]})
    with pytest.raises(ValueError, match="compresses every tap"):
        S.codec_record(6, ["enc.1"])


def test_measuring_the_first_batch_leaves_the_callers_rng_alone(tmp_path):
    from invcache.extraction import ExtractSettings, extract

    settings = dict(split="val2017", source="synthetic", synthetic_images=4, workspace=tmp_path, model="detr-tiny",
                    weights="random:0", size=(64, 96), num_workers=0, batch_size=2, shard_size=4)
    extract(ExtractSettings(**settings, out=tmp_path / "warm"))  # generates the split once
    draws = []
    for out, keepbits in (("probed", None), ("unprobed", 7)):  # --keepbits skips the probe
        torch.manual_seed(0)
        extract(ExtractSettings(**settings, out=tmp_path / out, keepbits=keepbits))
        draws.append(torch.rand(1).item())
    assert draws[0] == draws[1]
