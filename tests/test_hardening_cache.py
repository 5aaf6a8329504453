"""The cache under damage (issue 9): creation cut short, lost or swapped shard files, lost bookkeeping
chunks, corrupt metadata. Every reader names what is wrong in one line; verify lists every problem."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from google_crc32c import value as crc32c
from zarr.storage import LocalStore

from invcache.cache import schema as S
from invcache.cache.inspect import verify_cache
from invcache.cache.reader import CacheSamples
from invcache.cache.store import Cache, CacheCorruptError
from invcache.cli import main
from invcache.extraction import ExtractSettings, extract
from invcache.models.config import CONFIGS, DetrConfig

SIZE = (64, 96)


def settings_for(root: Path, out: Path, **overrides) -> ExtractSettings:
    base = dict(split="val2017", layers="all", coco_root=root, out=out, model="detr-tiny", weights="random:0",
                size=SIZE, batch_size=2, num_workers=0, shard_size=4)
    return ExtractSettings(**{**base, **overrides})


@pytest.fixture(scope="module")
def reference(synthetic_root, tmp_path_factory) -> Path:
    """A finished cache of every tap: 12 images (3 unreadable) in 3 shards of 4."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    extract(settings_for(synthetic_root, out))
    return out


@pytest.fixture
def copy(reference, tmp_path) -> Path:
    """A copy of the reference cache to damage."""
    shutil.copytree(reference, tmp_path / "cache")
    return tmp_path / "cache"


def shard_file(cache: Path, path: str, shard: int) -> Path:
    ndim = 4 if path == "input" else 3
    return cache / path / "c" / str(shard) / "/".join(["0"] * (ndim - 1))


def all_arrays(location: Path) -> dict[str, np.ndarray]:
    cache = Cache.open(location)
    names = [*cache.taps, *S.PER_IMAGE_ARRAYS, *S.PER_SHARD_ARRAYS]
    return {**{name: cache.array(name)[:] for name in names}, S.MEAN_IMAGE: cache.mean_image}


def edit_root_attributes(cache: Path, edit) -> None:
    metadata = json.loads((cache / "zarr.json").read_text())
    edit(metadata["attributes"])
    (cache / "zarr.json").write_text(json.dumps(metadata))


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# -- 2. creation window -----------------------------------------------------------------------


class SimulatedKill(Exception):
    """Stands for SIGKILL at the moment it is raised: nothing after it runs."""


def test_a_kill_right_after_the_root_group_exists_leaves_a_cache_the_same_command_recreates(
        synthetic_root, reference, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    set_key = LocalStore.set

    async def killed_after_the_root(self, key, value):
        await set_key(self, key, value)
        if key == "zarr.json":
            raise SimulatedKill

    monkeypatch.setattr(LocalStore, "set", killed_after_the_root)
    with pytest.raises(SimulatedKill):
        extract(settings_for(synthetic_root, out))
    monkeypatch.undo()
    # the root's one write already holds every attribute, the cache's state included
    attributes = json.loads((out / "zarr.json").read_text())["attributes"]
    assert attributes["schema_version"] == S.SCHEMA_VERSION and attributes["state"] == "creating"
    assert attributes["taps"] and attributes["model"]["config"]
    assert Cache.probe(out) == "creating"
    with pytest.raises(CacheCorruptError, match="creation was cut short"):
        Cache.open(out)

    again = extract(settings_for(synthetic_root, out))
    assert again.shards_written == 3
    expected, got = all_arrays(reference), all_arrays(out)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(expected[name], got[name], err_msg=name)


def test_every_write_of_the_root_metadata_is_a_whole_cache_record(synthetic_root, tmp_path, monkeypatch):
    written = []
    set_key = LocalStore.set

    async def recording(self, key, value):
        if key == "zarr.json":
            written.append(json.loads(value.to_bytes())["attributes"])
        await set_key(self, key, value)

    monkeypatch.setattr(LocalStore, "set", recording)
    extract(settings_for(synthetic_root, tmp_path / "cache", limit=4))
    assert [a["state"] for a in written[:2]] == ["creating", "ready"]
    assert all(a["schema_version"] == S.SCHEMA_VERSION and a["taps"] and a["shard_size"] == 4 for a in written)


# -- 3. complete shards whose file is lost or emptied ---------------------------------------------


@pytest.mark.parametrize("damage", ["deleted", "emptied"])
def test_a_complete_shards_lost_file_is_named_by_every_reader(copy, damage):
    lost = shard_file(copy, "enc/1", 1)
    lost.unlink() if damage == "deleted" else lost.write_bytes(b"")
    why = "its file is missing" if damage == "deleted" else "truncated: 0 bytes"
    named = rf"array enc/1 shard 1 does not verify \(ChecksumError: .*{why}"
    cache = Cache.open(copy)
    readers = {
        "Cache.read of the shard": lambda: cache.read("enc.1", 4, 8),
        "Cache.read of a row": lambda: cache.read("enc.1", 5, 6),
        "Cache.read of every row": lambda: cache.read("enc.1", 0, 12),
        "a view's rows": lambda: cache["enc.1"][[0, 5]],
        "a whole view": lambda: np.asarray(cache["enc.1"]),
        "the training dataset": lambda: list(CacheSamples(str(copy), ["enc.1"], shuffle=False)),
    }
    for what, read in readers.items():
        with pytest.raises(CacheCorruptError, match=named):
            read()
            pytest.fail(f"{what} read a lost shard")
    (problem,) = verify_cache(str(copy))
    assert "array enc/1 shard 1 does not verify" in problem and why in problem


# -- 4. lost bookkeeping chunks ---------------------------------------------------------------------


BOOKKEEPING_READERS = {
    S.VALID: lambda cache: cache.valid,
    S.IMAGE_ID: lambda cache: cache.image_ids,
    S.FAILURE: lambda cache: cache.failures(),
    S.ORIG_SIZE: lambda cache: cache.read(S.ORIG_SIZE, 0, len(cache)),
    S.SHARD_COMPLETE: lambda cache: cache.complete_shards(),
    S.SHARD_DIGEST: lambda cache: cache.read("enc.1", 4, 8),
}


@pytest.mark.parametrize("name", list(BOOKKEEPING_READERS))
def test_a_lost_bookkeeping_chunk_of_a_complete_shard_is_named(copy, name):
    chunk = copy / name / "c" / ("1/0" if name in (S.ORIG_SIZE, S.SHARD_DIGEST) else "1")
    chunk.unlink()
    named = f"array {name} shard 1 does not verify (missing chunk {name}/c/1"
    with pytest.raises(CacheCorruptError, match=named.replace("(", r"\(")):
        BOOKKEEPING_READERS[name](Cache.open(copy))
    if name in (S.VALID, S.SHARD_COMPLETE):  # what the training reader reads to list its rows
        with pytest.raises(CacheCorruptError, match=f"array {name} shard"):
            CacheSamples(str(copy), ["enc.1"])
    problems = verify_cache(str(copy))
    assert len(problems) == 1 and named in problems[0], problems


def test_shards_of_invalid_images_store_every_bookkeeping_chunk(tmp_path):
    # zarr skips a chunk equal to the fill value; an all-invalid shard's valid and orig_size chunks are exactly that
    cache = Cache.create(tmp_path / "c", num_images=4, tap_shapes={"enc.1": (2, 4)}, shard_size=2)
    for shard in range(2):
        meta = S.empty_bookkeeping(2)
        meta[S.IMAGE_ID][:] = [2 * shard + 1, 2 * shard + 2]
        meta[S.FAILURE][:] = "missing file"
        cache.write_shard(shard, {"enc.1": np.zeros((2, 2, 4), np.float16)}, meta)
    for name in S.PER_IMAGE_ARRAYS:
        assert (tmp_path / "c" / name / "c" / ("1/0" if name == S.ORIG_SIZE else "1")).is_file(), name
    assert not Cache.open(tmp_path / "c").valid.any() and verify_cache(str(tmp_path / "c")) == []


def test_incomplete_shards_need_no_chunks_and_read_as_unwritten(tmp_path):
    cache = Cache.create(tmp_path / "c", num_images=6, tap_shapes={"enc.1": (2, 4)}, shard_size=2)
    meta = S.empty_bookkeeping(2)
    meta[S.VALID][:] = True
    cache.write_shard(1, {"enc.1": np.ones((2, 2, 4), np.float16)}, meta)
    cache = Cache.open(tmp_path / "c")
    assert list(cache.complete_shards()) == [False, True, False]
    assert list(cache.valid) == [False, False, True, True, False, False]
    assert not cache.read("enc.1", 0, 2).any() and cache.failures() == []
    assert verify_cache(str(tmp_path / "c")) == []


def test_verify_holds_the_flags_to_the_complete_attribute(copy):
    zarr.open_group(copy, mode="r+")[S.SHARD_COMPLETE].with_config({"write_empty_chunks": True})[2] = False
    (problem,) = verify_cache(str(copy))
    assert problem == f"{copy}/zarr.json: complete is true, but shard_complete does not mark shards 2 complete"


# -- 5. corrupt metadata ------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def set_attribute(key, value):
    def edit(attrs):
        attrs[key] = value
    return edit


def delete_attribute(key):
    def edit(attrs):
        del attrs[key]
    return edit


def edit_config(key, value):
    def edit(attrs):
        attrs["model"]["config"][key] = value
    return edit


# kind: (damage, file named, what the one line says)
METADATA_DAMAGE = {
    "truncated root zarr.json": (lambda c: truncate(c / "zarr.json"), "zarr.json", "root metadata cannot be read"),
    "deleted schema_version": (lambda c: edit_root_attributes(c, delete_attribute("schema_version")), "zarr.json",
                               "schema_version is missing"),
    "older schema_version": (lambda c: edit_root_attributes(c, set_attribute("schema_version", 1)), "zarr.json",
                             "schema_version is 1, but this invcache reads schema 2"),
    "deleted taps": (lambda c: edit_root_attributes(c, delete_attribute("taps")), "zarr.json",
                     "taps is missing, not a list of tap names"),
    "unknown tap": (lambda c: edit_root_attributes(c, set_attribute("taps", ["input", "enc.x"])), "zarr.json",
                    "taps lists 'enc.x', not tap names"),
    "edited shard_size": (lambda c: edit_root_attributes(c, set_attribute("shard_size", 2)), "zarr.json",
                          "shard_size is 2, but every tap is stored in shards of 4 images"),
    "edited num_images": (lambda c: edit_root_attributes(c, set_attribute("num_images", 16)), "zarr.json",
                          "num_images is 16, but every array holds 12 images"),
    "zero num_images": (lambda c: edit_root_attributes(c, set_attribute("num_images", 0)), "zarr.json",
                        "num_images is 0, not a positive integer"),
    "deleted model": (lambda c: edit_root_attributes(c, delete_attribute("model")), "zarr.json",
                      "model is missing"),
    "edited d_model": (lambda c: edit_root_attributes(c, edit_config("d_model", 32)), "enc/0/zarr.json",
                       r"rows of shape \(6, 64\), but model.config and preprocessing.size make enc.0 rows \(6, 32\)"),
    "unknown config key": (lambda c: edit_root_attributes(c, edit_config("heads", 8)), "zarr.json",
                           "model.config has an unknown key 'heads'"),
    "edited image size": (lambda c: edit_root_attributes(c, lambda a: a["preprocessing"].update(size=[64, 64])),
                          "input/zarr.json", r"rows of shape \(64, 96, 3\)"),
    "edited keepbits": (lambda c: edit_root_attributes(c, lambda a: a["codec"].update(keepbits=6, uncompressed=[])),
                        "enc/0/zarr.json", "BitRound keepbits None, but codec.keepbits is 6"),
    # the record of the oldest caches (every tap with Blosc, bit-shuffled) over arrays stored raw
    "deleted uncompressed": (lambda c: edit_root_attributes(c, lambda a: [a["codec"].pop(k) for k in (
                                 "uncompressed", "input", "blocksize")] and a["codec"].update(shuffle="bitshuffle")),
                            "enc/0/zarr.json", r"no compressor, but codec.uncompressed is \[\]"),
    "deleted input codec": (lambda c: edit_root_attributes(c, lambda a: [a["codec"].pop(k) for k in (
                                "input", "blocksize")] and a["codec"].update(shuffle="bitshuffle")),
                            "input/zarr.json", "an image codec, but the codec record has no input codec"),
    "only the input codec kept": (lambda c: edit_root_attributes(c, lambda a: a["codec"].pop("uncompressed")),
                                  "zarr.json", "not a record of the cache's codec"),
    "uncompressed with keepbits": (lambda c: edit_root_attributes(c, lambda a: a["codec"].update(keepbits=6)),
                                   "zarr.json", "not a record of the cache's codec"),
    "missing array zarr.json": (lambda c: (c / "enc" / "1" / "zarr.json").unlink(), "enc/1/zarr.json", "is missing"),
    "truncated array zarr.json": (lambda c: truncate(c / "dec" / "2" / "zarr.json"), "dec/2/zarr.json",
                                  "cannot be read"),
    "truncated bookkeeping zarr.json": (lambda c: truncate(c / "valid" / "zarr.json"), "valid/zarr.json",
                                        "cannot be read"),
    "truncated mean_image zarr.json": (lambda c: truncate(c / "mean_image" / "zarr.json"),
                                       "mean_image/zarr.json", "cannot be read"),
}


@pytest.mark.parametrize("kind", list(METADATA_DAMAGE))
def test_corrupt_metadata_is_one_line_naming_the_file_when_opened_and_listed_by_verify(copy, kind):
    damage, file, says = METADATA_DAMAGE[kind]
    damage(copy)
    with pytest.raises(CacheCorruptError) as raised:
        Cache.open(copy)
    message = str(raised.value)
    assert "\n" not in message and f"{copy}/{file}" in message and re.search(says, message), message
    try:
        problems = verify_cache(str(copy))
    except CacheCorruptError as exc:  # a root that cannot be read at all: nothing else to check
        assert str(exc) == message
    else:
        assert problems and any(f"{copy}/{file}" in p for p in problems), problems


def test_a_damaged_root_is_neither_absent_nor_foreign(copy, tmp_path):
    truncate(copy / "zarr.json")
    with pytest.raises(CacheCorruptError, match="root metadata cannot be read"):
        Cache.probe(copy)
    zarr.open_group(tmp_path / "plain", mode="w", attributes={"author": "someone else"})
    assert Cache.probe(tmp_path / "plain") == "foreign"


def test_verify_lists_every_problem_not_only_the_first(copy):
    flip_byte(shard_file(copy, "enc/1", 1))
    (copy / S.VALID / "c" / "2").unlink()
    (copy / "dec" / "1" / "zarr.json").unlink()
    edit_root_attributes(copy, edit_config("num_queries", 50))
    problems = verify_cache(str(copy))
    expected = [
        f"{copy}/dec/1/zarr.json is missing",
        f"{copy}/dec/2/zarr.json: rows of shape (10, 64), but model.config and preprocessing.size make dec.2 rows",
        f"{copy}/head/logits/zarr.json: rows of shape (10, 92)",
        f"{copy}/head/boxes/zarr.json: rows of shape (10, 4)",
        f"{copy}: array enc/1 shard 1 does not verify",
        f"{copy}: array valid shard 2 does not verify (missing chunk valid/c/2",
    ]
    assert len(problems) == len(expected), problems
    for start in expected:
        assert any(p.startswith(start) for p in problems), (start, problems)


def test_verify_lists_damage_that_its_threads_hit_at_once(copy):
    for chunk in [p for p in copy.rglob("*") if p.is_file() and "/c/" in str(p.relative_to(copy.parent))]:
        flip_byte(chunk)
    problems = verify_cache(str(copy), threads=4)
    # every flag (so every shard counts as incomplete: its digests are not read), per-image chunk, tap shard
    # file and the mean image
    assert len(problems) == 3 + 3 * len(S.PER_IMAGE_ARRAYS) + 3 * len(Cache.open(copy).taps) + 1, problems


CLI_DAMAGE = ["truncated root zarr.json", "flipped byte in valid", "deleted taps", "edited shard_size",
              "missing array zarr.json"]


@pytest.mark.parametrize("kind", CLI_DAMAGE)
def test_every_command_reading_a_corrupt_cache_exits_nonzero_in_one_line(copy, tmp_path, kind, capsys):
    if kind == "flipped byte in valid":
        flip_byte(copy / S.VALID / "c" / "1")
        file = f"{copy}: array valid shard"
    else:
        damage, name, _ = METADATA_DAMAGE[kind]
        damage(copy)
        file = f"{copy}/{name}"
    workspace = tmp_path / "workspace"  # no modules, no validation cache: the cache's error comes first
    commands = {
        "info": ["info", str(copy)],
        "verify": ["verify", str(copy)],
        "train": ["train", "head-inv", "--cache", str(copy), "--root", str(workspace), "--epochs", "1"],
        "analyze": ["analyze", "stages", "--cache", str(copy), "--root", str(workspace)],
    }
    for command, args in commands.items():
        if command == "info":  # one real process: its exit status and what reaches its stderr
            result = subprocess.run([sys.executable, "-m", "invcache.cli", *args], capture_output=True, text=True,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
            returncode, stderr = result.returncode, result.stderr
        else:  # the same entry point in-process, which spares a start of Python and torch per command
            with pytest.raises(SystemExit) as exit_code:
                main(args)
            returncode, stderr = exit_code.value.code, capsys.readouterr().err
        lines = stderr.strip().splitlines()
        assert returncode == 1 and "Traceback" not in stderr, (command, stderr)
        if command == "verify" and len(lines) > 1:  # one line per problem, then the count
            assert all(line.startswith("corrupt: ") for line in lines[:-1]) and file in lines[0], stderr
            assert lines[-1].startswith("invcache: error: ")
        else:
            assert len(lines) == 1 and lines[0].startswith("invcache: error: ") and file in lines[0], (command, stderr)


def test_the_model_config_keys_and_tap_shapes_the_cache_checks_are_detr_configs():
    assert S.MODEL_CONFIG_KEYS == tuple(f.name for f in dataclasses.fields(DetrConfig))
    for config in CONFIGS.values():
        for size in [(480, 640), (64, 96), (100, 160)]:
            for tap in config.taps():
                expected = config.tap_shape(tap, size)
                if tap == "backbone.c5":  # the ResNet's channel count is left unchecked
                    expected = (expected[0], None)
                assert S.provenance_row_shape(tap, config.to_dict(), list(size)) == expected, (config.name, tap)
            assert S.provenance_row_shape(f"enc.{config.num_encoder_layers + 1}", config.to_dict(), size) is None


# -- 6. shard files at the wrong place --------------------------------------------------------------


def file_digest(path: Path, chunks_per_shard: int) -> int:
    """A shard file's digest from its bytes alone: the crc32c of its chunks' crc32c checksums, then its index."""
    data = path.read_bytes()
    index = data[-16 * chunks_per_shard - 4:-4]
    entries = np.frombuffer(index, "<u8").reshape(chunks_per_shard, 2).tolist()
    return crc32c(b"".join(data[o + n - 4:o + n] for o, n in entries if o != 2**64 - 1) + index)


def test_each_complete_shard_records_the_digest_of_its_files(reference):
    cache = Cache.open(reference)
    digests = zarr.open_group(reference, mode="r")[S.SHARD_DIGEST][:]  # plain zarr reads it
    assert digests.shape == (3, len(cache.taps)) and digests.dtype == np.uint32
    for i, tap in enumerate(cache.taps):
        for shard in range(3):
            assert digests[shard, i] == file_digest(shard_file(reference, S.array_path(tap), shard), 4), (tap, shard)
    assert len(set(digests.ravel().tolist())) == digests.size


def test_swapped_shard_files_are_named_by_verify_and_by_readers(copy):
    first, second = shard_file(copy, "enc/1", 0), shard_file(copy, "enc/1", 1)
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    problems = verify_cache(str(copy))
    assert len(problems) == 2, problems
    for shard, problem in enumerate(problems):
        assert f"array enc/1 shard {shard} does not verify" in problem and "not the one written" in problem
    cache = Cache.open(copy)
    for read in (lambda: cache.read("enc.1", 0, 12), lambda: cache["enc.1"][4],
                 lambda: list(CacheSamples(str(copy), ["enc.1"], shuffle=False))):
        with pytest.raises(CacheCorruptError, match=r"array enc/1 shard [01] does not verify .*swapped"):
            read()


def test_a_shard_file_from_another_cache_is_named(tmp_path):
    # Tiny rows compress to chunks of one size: a crc32c of the whole file would be the same for every shard.
    caches = []
    for seed, name in enumerate(["ours", "theirs"]):
        cache = Cache.create(tmp_path / name, num_images=4, tap_shapes={"enc.1": (2, 4)}, shard_size=2)
        for shard in range(2):
            meta = S.empty_bookkeeping(2)
            meta[S.VALID][:] = True
            rows = np.random.default_rng([seed, shard]).standard_normal((2, 2, 4)).astype(np.float16)
            cache.write_shard(shard, {"enc.1": rows}, meta)
        caches.append(cache)
    shutil.copy(shard_file(tmp_path / "theirs", "enc/1", 1), shard_file(tmp_path / "ours", "enc/1", 1))
    (problem,) = verify_cache(str(tmp_path / "ours"))
    assert "array enc/1 shard 1 does not verify" in problem and "replaced" in problem
    np.testing.assert_array_equal(Cache.open(tmp_path / "ours").read("enc.1", 0, 2), caches[0].read("enc.1", 0, 2))
