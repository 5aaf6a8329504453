"""Extraction into the zarr cache: round trip, resume, crash safety, distribution, bad input, verify."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from numcodecs import Blosc

from invcache.cache import schema as S
from invcache.cache.inspect import cache_info, verify_cache
from invcache.cache.store import Cache, CacheCorruptError
from invcache.data import CocoFolder, coco_to_wds
from invcache.data.synthetic import UNREADABLE_FAULTS
from invcache.errors import InvcacheError
from invcache.extraction import ExtractSettings, extract
from invcache.forward import forward_taps
from invcache.models import build_detr

SIZE = (64, 96)


def settings_for(root: Path, out: Path, **overrides) -> ExtractSettings:
    base = dict(split="val2017", layers="all", coco_root=root, out=out, model="detr-tiny", weights="random:0",
                size=SIZE, batch_size=2, num_workers=0, shard_size=4)
    return ExtractSettings(**{**base, **overrides})


def cli_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "--split", "val2017", "--coco-root", str(root), "--out", str(out), "--model", "detr-tiny",
            "--weights", "random:0", "--size", "64x96", "--batch-size", "2", "--num-workers", "0",
            "--shard-size", "4", *extra]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invcache.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def all_arrays(location: Path) -> dict[str, np.ndarray]:
    """Every array of a cache, the stored mean image included (resumed and distributed runs must match it too)."""
    cache = Cache.open(location)
    arrays = {name: cache.array(name)[:] for name in [*cache.taps, *S.PER_IMAGE_ARRAYS, S.SHARD_COMPLETE]}
    return {**arrays, "mean_image": cache.mean_image}


def assert_same_arrays(a: Path, b: Path) -> None:
    left, right = all_arrays(a), all_arrays(b)
    assert left.keys() == right.keys()
    for name in left:
        assert np.array_equal(left[name], right[name]), name


@pytest.fixture(scope="module")
def reference(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "cache"
    result = extract(settings_for(synthetic_root, out))
    return out, result


def test_round_trip_every_tap_equals_a_direct_forward_on_the_stored_input(synthetic_root, reference):
    out, result = reference
    cache = Cache.open(out)
    dataset = CocoFolder(synthetic_root, "val2017", SIZE)
    ids = cache.array(S.IMAGE_ID)[:]
    assert list(ids) == dataset.image_ids and list(ids) == sorted(ids)
    assert cache.complete_shards().all() and result.shards_written == 3

    model = build_detr("detr-tiny", "random:0")
    taps = cache.taps
    assert taps == model.config.select_taps("all")
    stored_input = torch.from_numpy(cache.array("input")[:])
    direct = forward_taps(model, stored_input, taps)
    valid = cache.array(S.VALID)[:]
    for tap in taps:
        stored = cache.array(tap)[:]
        assert stored.dtype == (np.uint8 if tap == "input" else np.float16)
        expected = direct[tap].numpy() if tap == "input" else direct[tap].to(torch.float16).numpy()
        np.testing.assert_allclose(stored[valid].astype(np.float32), expected[valid].astype(np.float32),
                                   atol=2e-3, rtol=2e-3, err_msg=tap)
        assert not stored[~valid].any(), f"{tap}: rows of unreadable images must stay zeros"

    for i, image_id in enumerate(ids):
        assert tuple(cache.array(S.ORIG_SIZE)[i]) == (dataset.coco.imgs[image_id]["height"],
                                                      dataset.coco.imgs[image_id]["width"])
    attrs = cache.attrs
    for key in ("schema_version", "model", "preprocessing", "source", "taps", "shard_size", "codec", "versions",
                "created", "failures", "state"):
        assert key in attrs, key
    assert attrs["model"]["weights_sha256"] == model.fingerprint["weights_sha256"]
    assert attrs["source"]["annotation_sha256"] and attrs["source"]["images"] == len(ids)
    assert attrs["preprocessing"]["size"] == list(SIZE)
    # the taps stored raw are those Blosc shrinks by less than 1.08x on the first batch (2 images), one chunk each
    blosc = Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE, blocksize=1 << 20)
    first = np.flatnonzero(valid[:2])
    ratios = {tap: sum(cache.array(tap)[i].nbytes for i in first)
              / sum(len(blosc.encode(cache.array(tap)[i])) for i in first) for tap in taps if tap != "input"}
    raw = [tap for tap in taps if tap != "input" and ratios[tap] < 1.08]
    assert raw and all(type(cache.array(t).compressors[0]).__name__ == "Crc32cCodec" for t in raw)
    assert attrs["codec"] == {"name": "blosc", "cname": "zstd", "clevel": 1, "shuffle": "shuffle", "blocksize": 1 << 20,
                              "checksum": "crc32c", "keepbits": None, "uncompressed": raw,
                              "input": {"name": "numcodecs.imagecodecs_jpegxl",
                                        "configuration": {"lossless": True, "effort": 1}}}


def test_the_mean_image_is_the_numpy_mean_of_valid_inputs_and_survives_a_resume(reference, tmp_path, synthetic_root):
    out, _ = reference
    cache = Cache.open(out)
    inputs, valid = cache.array("input")[:], cache.array(S.VALID)[:]
    assert not valid.all()
    expected = inputs[valid].astype(np.float64).mean(axis=0) / 255
    np.testing.assert_allclose(cache.mean_image, expected, rtol=0, atol=1e-12)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    Cache.open(copy, mode="r+").array(S.SHARD_COMPLETE)[1] = False  # as if shard 1 had been cut short
    again = extract(settings_for(synthetic_root, copy))
    assert again.shards_written == 1 and again.shards_skipped == 2
    np.testing.assert_array_equal(Cache.open(copy).mean_image, cache.mean_image)


def test_a_rerun_with_nothing_to_do_reads_no_input_back(reference, tmp_path, synthetic_root, monkeypatch):
    out, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)

    def refuse(self, shards):
        raise AssertionError("a finished cache's mean image was recomputed")

    monkeypatch.setattr(Cache, "sum_valid_input", refuse)
    assert extract(settings_for(synthetic_root, copy)).shards_written == 0


@pytest.mark.parametrize("size", [(100, 160), (0, 64), "128x160"])
def test_the_api_refuses_sizes_the_cli_refuses(synthetic_root, tmp_path, size):
    from invcache.errors import UsageError

    with pytest.raises(UsageError, match="bad size"):
        extract(settings_for(synthetic_root, tmp_path / "c", size=size))
    assert not (tmp_path / "c").exists()


def test_progress_is_reported_per_batch(synthetic_root, tmp_path):
    calls, planned = [], []
    extract(settings_for(synthetic_root, tmp_path / "c"), progress=lambda n, b: calls.append((n, b)),
            on_plan=planned.append)
    assert planned == [12] and [n for n, _ in calls] == [2] * 6  # batch size 2, 12 images
    assert all(b > 0 for _, b in calls)


def test_a_moved_coco_folder_resumes_but_other_annotations_are_refused(synthetic_root, reference, tmp_path):
    out, _ = reference
    moved = tmp_path / "moved-coco"
    shutil.copytree(synthetic_root, moved)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    again = extract(settings_for(moved, copy))
    assert again.shards_written == 0 and again.shards_skipped == 3
    annotation = moved / "annotations" / "instances_val2017.json"
    annotation.write_text(annotation.read_text().replace('"iscrowd": 0', '"iscrowd": 1', 1))
    with pytest.raises(InvcacheError, match="source.annotation_sha256"):
        extract(settings_for(moved, copy))


def test_broken_inputs_are_recorded_and_the_rest_extracted(synthetic_root, reference):
    out, result = reference
    cache = Cache.open(out)
    faults = {int(k): v for k, v in CocoFolder(synthetic_root, "val2017").coco.dataset["info"]["faults"].items()}
    recorded = {f["image_id"]: f["reason"] for f in cache.attrs["failures"]}
    assert recorded == {f["image_id"]: f["reason"] for f in result.failures}
    assert set(recorded) == {i for i, fault in faults.items() if fault in UNREADABLE_FAULTS}
    assert "truncated" in recorded[next(i for i, f in faults.items() if f == "truncated")]
    ids, valid = list(cache.array(S.IMAGE_ID)[:]), cache.array(S.VALID)[:]
    for image_id, fault in faults.items():
        assert valid[ids.index(image_id)] == (fault not in UNREADABLE_FAULTS), fault
        if fault in ("grayscale", "cmyk", "palette", "rgba", "gray16"):
            assert cache.array("input")[ids.index(image_id)].std() > 5, fault


def test_rerun_skips_complete_shards_and_other_settings_are_refused(synthetic_root, reference, tmp_path):
    out, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    again = extract(settings_for(synthetic_root, copy))
    assert again.shards_written == 0 and again.shards_skipped == 3
    assert_same_arrays(out, copy)

    with pytest.raises(InvcacheError, match=r"taps: .*enc.0.*--overwrite"):
        extract(settings_for(synthetic_root, copy, layers="enc.*"))
    with pytest.raises(InvcacheError, match=r"preprocessing.size: \[64, 96\] -> \[64, 128\]"):
        extract(settings_for(synthetic_root, copy, size=(64, 128)))
    with pytest.raises(InvcacheError, match=r"model.weights_sha256"):
        extract(settings_for(synthetic_root, copy, weights="random:1"))
    replaced = extract(settings_for(synthetic_root, copy, layers="enc.*", overwrite=True))
    assert replaced.shards_written == 3 and Cache.open(copy).taps == ["enc.0", "enc.1", "enc.2"]


def test_a_foreign_zarr_group_is_not_overwritten(synthetic_root, tmp_path):
    import zarr

    zarr.open_group(tmp_path / "theirs", mode="w").create_array("data", shape=(3,), dtype="i4")
    with pytest.raises(InvcacheError, match="not an invcache cache"):
        extract(settings_for(synthetic_root, tmp_path / "theirs"))
    assert (tmp_path / "theirs" / "data").is_dir()


def test_a_folder_with_other_files_is_not_overwritten(synthetic_root, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(InvcacheError, match="not an invcache cache"):
        extract(settings_for(synthetic_root, tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_creation_cut_short_is_recreated(synthetic_root, reference, tmp_path):
    out, _ = reference
    Cache.create(tmp_path / "c", num_images=3, tap_shapes={"enc.0": (2, 4)}, attributes={"state": "creating"})
    assert Cache.probe(tmp_path / "c") == "creating"
    extract(settings_for(synthetic_root, tmp_path / "c"))
    assert_same_arrays(out, tmp_path / "c")


def test_a_lost_shard_file_of_a_complete_shard_is_named(reference, tmp_path):
    out, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "dec" / "2" / "c" / "2" / "0" / "0").unlink()
    problems = verify_cache(str(copy))
    assert len(problems) == 1 and "dec/2 shard 2" in problems[0] and "missing" in problems[0]


def test_disk_estimate_refuses_unless_forced(synthetic_root, tmp_path, monkeypatch, caplog):
    import logging

    import invcache.extraction.run as E

    caplog.set_level(logging.INFO, logger="invcache")

    monkeypatch.setattr(E.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**6, 10**6 - 10, 10))
    with pytest.raises(InvcacheError, match="not enough disk"):
        extract(settings_for(synthetic_root, tmp_path / "c"))
    assert "disk estimate" in caplog.text
    assert not (tmp_path / "c").exists()
    assert extract(settings_for(synthetic_root, tmp_path / "c", force=True, limit=4)).shards_written == 1


def test_flipped_byte_is_named_by_verify_and_by_readers(reference, tmp_path):
    out, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert verify_cache(str(copy)) == []
    shard_file = copy / "enc" / "1" / "c" / "1" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[len(data) // 4] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    problems = verify_cache(str(copy))
    assert len(problems) == 1 and "enc/1 shard 1" in problems[0]
    with pytest.raises(CacheCorruptError, match="enc/1 shard 1"):
        Cache.open(copy).read("enc.1", 4, 8)
    result = run_cli("verify", str(copy))
    assert result.returncode == 1 and "enc/1 shard 1" in result.stderr and "Traceback" not in result.stderr


def test_info_reports_sizes_and_failures(reference):
    out, _ = reference
    summary = cache_info(str(out))
    assert summary["complete_shards"] == summary["num_shards"] == 3
    assert len(summary["failures"]) == len(UNREADABLE_FAULTS)
    enc = next(a for a in summary["arrays"] if a["name"] == "enc/2")
    assert enc["stored_bytes"] > 0 and enc["raw_bytes"] == 12 * 6 * 64 * 2
    result = run_cli("info", str(out))
    assert result.returncode == 0 and "head/logits" in result.stdout and "failures: 3" in result.stdout


def test_keepbits_is_lossy_within_its_bound(synthetic_root, reference, tmp_path):
    out, _ = reference
    lossy = tmp_path / "lossy"
    extract(settings_for(synthetic_root, lossy, keepbits=4))
    exact, rounded = Cache.open(out).array("enc.2")[:], Cache.open(lossy).array("enc.2")[:]
    assert not np.array_equal(exact, rounded)
    big = np.abs(exact) > 1e-3
    relative = np.abs(rounded[big].astype(np.float32) - exact[big]) / np.abs(exact[big].astype(np.float32))
    assert relative.max() <= 2.0 ** -5 + 1e-3
    assert np.array_equal(Cache.open(out).array("input")[:], Cache.open(lossy).array("input")[:])
    assert cache_info(str(lossy))["keepbits_error"]["max_relative"] == 2.0 ** -5


def test_strict_exits_nonzero_after_writing_everything(synthetic_root, tmp_path):
    result = run_cli(*cli_args(synthetic_root, tmp_path / "c", "--strict"))
    assert result.returncode == 1 and "--strict" in result.stderr and "disk estimate" in result.stderr
    assert "truncated" in result.stdout
    assert Cache.open(tmp_path / "c").complete_shards().all()


@pytest.mark.parametrize("extra, needle", [
    (["--layers", "enc.9"], "unknown tap 'enc.9'"),
    (["--size", "64x"], "bad size"),
    (["--model", "detr-r42"], "unknown model"),
    (["--keepbits", "12"], "--keepbits"),
    (["--device", "bogus"], "bad --device"),
    (["--num-workers", "-1"], "--num-workers"),
])
def test_wrong_cli_values_exit_2(synthetic_root, tmp_path, extra, needle):
    result = run_cli(*cli_args(synthetic_root, tmp_path / "c", *extra))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_coco_says_how_to_get_it(tmp_path):
    result = run_cli("extract", "--split", "train2017", "--layers", "all", "--coco-root", str(tmp_path / "none"),
                     "--root", str(tmp_path))
    assert result.returncode == 2 and "cocodataset.org" in result.stderr and "--source synthetic" in result.stderr


def test_default_location_is_the_workspace(tmp_path):
    settings = ExtractSettings(split="val2017", source="synthetic", workspace=tmp_path, model="detr-tiny",
                               weights="random:0", size=SIZE, num_workers=0, synthetic_images=5)
    result = extract(settings)
    assert result.cache == str(tmp_path / "cache" / "val2017") and result.images == 5
    assert Cache.open(result.cache).attrs["source"]["kind"] == "synthetic"


def test_webdataset_source_gives_the_same_cache(synthetic_root, reference, tmp_path):
    out, _ = reference
    coco_to_wds(synthetic_root, "val2017", tmp_path / "wds", images_per_shard=5)
    pattern = str(tmp_path / "wds" / "coco-val2017-{000000..000002}.tar")
    extract(settings_for(synthetic_root, tmp_path / "from-wds", wds=pattern, num_workers=2))
    left, right = all_arrays(out), all_arrays(tmp_path / "from-wds")
    for name in left:
        if name in ("input", S.IMAGE_ID, S.ORIG_SIZE, S.VALID, S.SHARD_COMPLETE):
            assert np.array_equal(left[name], right[name]), name
        elif name != S.FAILURE:
            # workers split the tars, so batches group other images: CPU kernels may round differently
            np.testing.assert_allclose(left[name].astype(np.float32), right[name], atol=2e-3, rtol=2e-3)
    assert Cache.open(tmp_path / "from-wds").attrs["source"]["kind"] == "wds"


def _wait_for(predicate, process, timeout=120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.002)
    return False


@pytest.mark.parametrize("moment", ["mid-shard", "between-shards", "late"])
def test_sigkill_at_any_moment_then_the_same_command_completes_identically(synthetic_root, reference, tmp_path,
                                                                           moment):
    out, _ = reference
    target = tmp_path / "c"
    args = [sys.executable, "-m", "invcache.cli", *cli_args(synthetic_root, target)]
    markers = target / S.SHARD_COMPLETE / "c"
    conditions = {
        # the first tap of shard 0 is on disk but the shard is not yet marked complete
        "mid-shard": lambda: (target / "input" / "c" / "0").exists() and not (markers / "0").exists(),
        "between-shards": lambda: (markers / "0").exists(),
        "late": lambda: (markers / "1").exists(),
    }
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        hit = _wait_for(conditions[moment], process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert hit, f"the run ended before reaching {moment}"
    result = run_cli(*cli_args(synthetic_root, target))
    assert result.returncode == 0, result.stderr
    assert_same_arrays(out, target)
    assert not list(target.rglob("*.partial"))


def test_two_rank_torchrun_store_equals_one_rank(synthetic_root, tmp_path):
    # Both runs use one thread per process, so the CPU kernels round identically and the stores match bit for bit.
    env = {"OMP_NUM_THREADS": "1"}
    single = run_cli(*cli_args(synthetic_root, tmp_path / "single"), env=env)
    assert single.returncode == 0, single.stderr
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "invcache.cli", *cli_args(synthetic_root, tmp_path / "ddp")],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_arrays(tmp_path / "single", tmp_path / "ddp")
    assert len(Cache.open(tmp_path / "ddp").attrs["failures"]) == len(UNREADABLE_FAULTS)
