"""The input tap's lossless JPEG XL codec: bit-exact on photographs, read by plain zarr, damage named, old caches
open."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import skimage.data
import zarr
from google_crc32c import value as crc32c
from PIL import Image

from invcache.cache import schema as S
from invcache.cache.image_codec import JPEGXL_NAME, JpegXlCodec
from invcache.cache.inspect import verify_cache
from invcache.cache.shard_codec import ShardCodec
from invcache.cache.store import Cache, CacheCorruptError

SIZE = (120, 160)


def photographs(n: int) -> np.ndarray:
    """Real photographs (scikit-image's bundled colour samples) resized to SIZE, as extraction stores input."""
    folder = Path(skimage.data.__file__).parent
    names = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"][:n]
    return np.stack([np.asarray(Image.open(folder / name).convert("RGB").resize(SIZE[::-1], Image.BILINEAR))
                     for name in names])


def write_input(root, images: np.ndarray, shard_size: int = 2) -> Cache:
    cache = Cache.create(root, num_images=len(images), tap_shapes={"input": images.shape[1:]}, shard_size=shard_size)
    for shard in range(S.num_shards(len(images), shard_size)):
        rows = images[slice(*cache.shard_bounds(shard))]
        meta = S.empty_bookkeeping(len(rows))
        meta[S.IMAGE_ID][:] = np.arange(*cache.shard_bounds(shard)) + 1
        meta[S.VALID][:] = True
        cache.write_shard(shard, {"input": rows}, meta)
    return cache


def test_input_is_stored_bit_exact_and_smaller_than_half_its_bytes(tmp_path):
    images = photographs(4)
    cache = write_input(tmp_path / "c", images)
    assert cache.attrs["codec"]["input"] == {"name": JPEGXL_NAME, "configuration": {"lossless": True, "effort": 1}}
    np.testing.assert_array_equal(np.concatenate([cache.read_shard("input", s) for s in range(2)]), images)
    stored = sum(f.stat().st_size for f in (tmp_path / "c" / "input").rglob("*")
                 if f.is_file() and f.name != "zarr.json")
    assert stored < images.nbytes / 2, (stored, images.nbytes)
    # each chunk is a bare JPEG XL codestream (its signature first), which libjxl reads back to the same pixels
    chunk = ShardCodec(cache.array("input")).encode(images[:1])[0][:-4]
    assert chunk[:2] == b"\xff\x0a"
    np.testing.assert_array_equal(imagecodecs.jpegxl_decode(chunk), images[0])
    assert verify_cache(str(tmp_path / "c")) == []


def test_plain_zarr_in_a_fresh_process_reads_input_without_importing_invcache_first(tmp_path):
    images = photographs(3)
    write_input(tmp_path / "c", images)
    script = ("import hashlib, sys, zarr; a = zarr.open_group(sys.argv[1], mode='r')['input'][:]; "
              "print(a.shape, hashlib.sha256(a.tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "c")], capture_output=True, text=True,
                         check=True).stdout.split()[-1]
    assert out == hashlib.sha256(images.tobytes()).hexdigest()
    meta = json.loads((tmp_path / "c" / "input" / "zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"]
    assert [c["name"] for c in inner] == [JPEGXL_NAME, "crc32c"]


def test_a_chunk_that_is_not_an_image_of_the_row_is_damage_naming_the_shard(tmp_path):
    images = photographs(2)
    cache = write_input(tmp_path / "c", images)
    # another cache's input shard: valid JPEG XL chunks and crc32c, but images of another size
    other = write_input(tmp_path / "o", photographs(2)[:, :60])
    target = tmp_path / "c" / "input" / "c" / "0" / "0" / "0" / "0"
    target.write_bytes((tmp_path / "o" / "input" / "c" / "0" / "0" / "0" / "0").read_bytes())
    with pytest.raises(CacheCorruptError, match=r"input.*shard 0.*image 0 of the shard is not a JPEG XL image of its "
                                                r"row's shape \(120, 160, 3\)"):
        cache.decode_shard("input", 0, complete=True, digest=None)
    with pytest.raises(ValueError, match="JPEG XL decoding failed"):  # plain zarr refuses it as well
        zarr.open_group(tmp_path / "c", mode="r")["input"][0]
    # an uncompressed tap's shard in its place: the crc32c hold, the bytes are no image
    raw = Cache.create(tmp_path / "r", num_images=2, tap_shapes={"enc.1": (4, 8)}, shard_size=2)
    ShardCodec(raw.array("enc.1")).write(0, np.ones((2, 4, 8), np.float16))
    target.write_bytes((tmp_path / "r" / "enc" / "1" / "c" / "0" / "0" / "0").read_bytes())
    with pytest.raises(CacheCorruptError, match=r"image 0 of the shard is not a JPEG XL image"):
        cache.decode_shard("input", 0, complete=True, digest=None)
    assert other.attrs["codec"] == cache.attrs["codec"]


def test_damaged_image_chunks_and_absurd_shard_files_are_damage_not_crashes(tmp_path):
    images = photographs(2)
    cache = write_input(tmp_path / "c", images)
    codec = ShardCodec(cache.array("input"))
    target = tmp_path / "c" / "input" / "c" / "0" / "0" / "0" / "0"
    # the first bytes of a real chunk, with its crc32c and index rewritten to match: libjxl cannot even count frames
    head = codec.encode(images[:1])[0][:5]
    rebuilt = head + np.uint32(crc32c(head)).tobytes()
    index = np.full((2, 2), np.iinfo(np.uint64).max, "<u8")
    index[0] = 0, len(rebuilt)
    target.write_bytes(rebuilt + index.tobytes() + np.uint32(crc32c(index.tobytes())).tobytes())
    with pytest.raises(CacheCorruptError, match="image 0 of the shard is not a JPEG XL image"):
        cache.decode_shard("input", 0, complete=False, digest=None)
    # a transposed image of the same pixel count: refused by invcache's reader and by plain zarr
    transposed = Cache.create(tmp_path / "t", num_images=2, tap_shapes={"input": (160, 120, 3)}, shard_size=2)
    ShardCodec(transposed.array("input")).write(0, images.transpose(0, 2, 1, 3))
    target.write_bytes((tmp_path / "t" / "input" / "c" / "0" / "0" / "0" / "0").read_bytes())
    with pytest.raises(CacheCorruptError, match="not a JPEG XL image of its row's shape"):
        cache.decode_shard("input", 0, complete=True, digest=None)
    with pytest.raises(ValueError, match="JPEG XL decoding failed"):
        zarr.open_group(tmp_path / "c", mode="r")["input"][0]
    # a sparse file far larger than two images could take is refused before it is read
    with open(target, "wb") as f:
        f.truncate(40 * 2**30)
    with pytest.raises(CacheCorruptError, match=r"the shard file is 42949672960 bytes, more than its 2 images"):
        cache.decode_shard("input", 0, complete=True, digest=None)


def test_only_lossless_configurations_are_accepted():
    assert JpegXlCodec.from_dict({"name": JPEGXL_NAME, "configuration": {"lossless": True, "effort": 3}}).effort == 3
    for bad in ({"lossless": False}, {"effort": 0}, {"effort": True}, {"distance": 1.0}):
        with pytest.raises(ValueError, match=JPEGXL_NAME):
            JpegXlCodec.from_dict({"name": JPEGXL_NAME, "configuration": bad})
    with pytest.raises(ValueError, match="one RGB uint8 image"):
        JpegXlCodec().encode_image(np.zeros((2, 4, 5, 3), np.uint8))


def test_a_cache_made_before_the_image_codec_still_opens_and_verifies(tmp_path, monkeypatch):
    images = photographs(2)
    with monkeypatch.context() as patch:  # input with Blosc (bit-shuffled, its own blocks), as caches were made before
        patch.setattr(S, "stored_as_image", lambda tap, codec: False)
        patch.setattr(S, "BLOSC_SHUFFLE", "bitshuffle")
        patch.setattr(S, "BLOSC_BLOCKSIZE", 0)
        cache = write_input(tmp_path / "old", images)
    group = zarr.open_group(tmp_path / "old", mode="r+")
    group.attrs["codec"] = {k: v for k, v in group.attrs["codec"].items() if k not in ("input", "blocksize")}
    reopened = Cache.open(str(tmp_path / "old"))
    assert [type(c).__name__ for c in reopened.array("input").compressors] == ["BloscCodec", "Crc32cCodec"]
    np.testing.assert_array_equal(reopened.read_shard("input", 0), images)
    assert verify_cache(str(tmp_path / "old")) == []
    # the record claiming the image codec over Blosc-stored input is named as damage
    group.attrs["codec"] = S.codec_record(None)
    problems = verify_cache(str(tmp_path / "old"))
    assert any("input/zarr.json: no image codec, but the codec record has an input codec" in p
               for p in problems), problems
    assert cache is not None
