"""Extraction under hostile conditions (issue 9): a second writer, --overwrite on the wrong folder, OS errors, sizes."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import invcache.extraction.run as run
from invcache.cache import schema as S
from invcache.cache.inspect import verify_cache
from invcache.cache.lock import lock_path, writer_lock
from invcache.cache.store import Cache
from invcache.errors import UsageError
from invcache.extraction import ExtractSettings, estimate_bytes, extract
from invcache.extraction.run import format_bytes

SIZE = (64, 96)


def settings_for(root: Path, out: Path | str, **overrides) -> ExtractSettings:
    base = dict(split="val2017", layers="all", coco_root=root, out=out, model="detr-tiny", weights="random:0",
                size=SIZE, batch_size=2, num_workers=0, shard_size=4)
    return ExtractSettings(**{**base, **overrides})


def cli_args(root: Path, out: Path | str, *extra: str) -> list[str]:
    return ["extract", "--split", "val2017", "--coco-root", str(root), "--out", str(out), "--model", "detr-tiny",
            "--weights", "random:0", "--size", "64x96", "--batch-size", "2", "--num-workers", "0",
            "--shard-size", "4", *extra]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invcache.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "invcache.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("invcache: error:")]


def assert_same_arrays(a: Path, b: Path) -> None:
    left, right = Cache.open(a), Cache.open(b)
    names = [*left.taps, *S.PER_IMAGE_ARRAYS, S.SHARD_COMPLETE]
    assert names == [*right.taps, *S.PER_IMAGE_ARRAYS, S.SHARD_COMPLETE]
    for name in names:
        assert np.array_equal(left.array(name)[:], right.array(name)[:]), name
    np.testing.assert_array_equal(left.mean_image, right.mean_image)


def wait_for(predicate, process: subprocess.Popen, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.005)
    return False


def holder_pid(lock: Path) -> int | None:
    try:
        return json.loads(lock.read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture(scope="module")
def reference(synthetic_root, tmp_path_factory) -> Path:
    """An uninterrupted extraction with the settings every test here uses."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    extract(settings_for(synthetic_root, out))
    return out


@pytest.fixture
def no_rmtree(monkeypatch):
    """Tests that point --overwrite at precious folders must not be able to delete them, even when they fail."""
    def refuse(path, *args, **kwargs):
        raise AssertionError(f"rmtree({path}) was called")

    monkeypatch.setattr(run.shutil, "rmtree", refuse)


# -- 1. one writer per cache ------------------------------------------------------------------


def test_the_writer_lock_refuses_a_second_holder_naming_the_first_and_cleans_up(tmp_path):
    cache = tmp_path / "sub" / "cache"
    lock = lock_path(cache)
    assert lock == tmp_path / "sub" / ".cache.invcache-lock"
    with writer_lock(cache):
        assert lock.parent.is_dir() and not cache.exists()  # the parent is made, the cache folder is not
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] and holder["started"] and holder["command"]
        # flock conflicts between two opens in one process too, so this is a second writer
        with pytest.raises(UsageError, match=rf"being written by another process \(pid {os.getpid()} on "):
            with writer_lock(tmp_path / "sub" / "." / "cache"):  # another spelling of the same folder
                pass
    assert not lock.exists()
    with writer_lock(cache):  # released on the way out of the block, also by an exception
        pass


def test_a_lock_file_without_a_live_flock_does_not_block(tmp_path):
    lock = lock_path(tmp_path / "cache")
    lock.write_text(json.dumps({"pid": 999999, "host": "gone", "started": "long ago", "command": "killed"}))
    with writer_lock(tmp_path / "cache"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_urls_are_not_locked_and_the_root_is_refused(tmp_path):
    with writer_lock("s3://bucket/cache"):
        with writer_lock("s3://bucket/cache"):
            pass
    with pytest.raises(UsageError, match="filesystem root"):
        lock_path("/")


def test_a_second_extract_on_the_same_cache_exits_2_naming_the_holder(synthetic_root, reference, tmp_path):
    out = tmp_path / "cache"
    first = start_cli(*cli_args(synthetic_root, out))
    try:
        # Shard 0 is being written: a second run's resume would clear it under the first run's feet.
        assert wait_for((out / "input" / "c" / "0").exists, first), first.communicate()[1]
        first.send_signal(signal.SIGSTOP)  # keep it in the middle, however fast it would finish
        second = run_cli(*cli_args(synthetic_root, out))
        holder = holder_pid(lock_path(out))
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert holder == first.pid
    assert error_lines(second) and f"pid {first.pid} on " in second.stderr and "being written" in second.stderr
    assert verify_cache(str(out)) == []
    assert_same_arrays(reference, out)
    assert not lock_path(out).exists()


def test_a_lock_left_by_a_killed_extract_does_not_block_the_rerun(synthetic_root, reference, tmp_path):
    out = tmp_path / "cache"
    first = start_cli(*cli_args(synthetic_root, out))
    try:
        hit = wait_for((out / "input" / "c" / "0").exists, first)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert hit, "the first run ended before it wrote a shard"
    assert holder_pid(lock_path(out)) == first.pid  # the file stays behind; its flock died with the process
    result = extract(settings_for(synthetic_root, out))
    assert result.shards_written + result.shards_skipped == 3
    assert_same_arrays(reference, out)
    assert not lock_path(out).exists()


def test_under_torchrun_a_refused_rank_0_stops_every_rank(synthetic_root, tmp_path):
    out = tmp_path / "cache"
    started = time.monotonic()
    with writer_lock(out):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "-m", "invcache.cli", *cli_args(synthetic_root, out)],
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
        )
    # Every rank raises the refusal at once (none waits at a barrier for the 2-hour collective timeout);
    # the first to exit makes torchrun stop the other, which may not have printed its line yet.
    assert result.returncode != 0 and time.monotonic() - started < 120
    refusals = [line for line in result.stderr.splitlines() if "being written by another process" in line]
    assert refusals and all(line.startswith("invcache: error:") and f"pid {os.getpid()} on " in line
                            for line in refusals), result.stderr[-3000:]
    assert re.search(r"exitcode\s*:\s*2\b", result.stderr), result.stderr[-3000:]
    assert not out.exists()


# -- 8. --overwrite replaces only a cache -----------------------------------------------------


@pytest.mark.parametrize("out, cwd, reason", [
    (".", "work", "the current working directory"),
    ("..", "work/inner", "an ancestor of the current working directory"),
    ("{tmp}/work", "work/inner", "an ancestor of the current working directory"),
])
def test_overwrite_refuses_the_working_directory_and_its_ancestors(synthetic_root, tmp_path, out, cwd, reason):
    (tmp_path / cwd).mkdir(parents=True)
    (tmp_path / "work" / "notes.txt").write_text("keep me")
    result = run_cli(*cli_args(synthetic_root, out.format(tmp=tmp_path), "--overwrite"), cwd=tmp_path / cwd)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert error_lines(result) and reason in result.stderr and "--overwrite would delete" in result.stderr
    assert (tmp_path / "work" / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob("**/zarr.json"))


def test_overwrite_refuses_a_folder_that_is_not_a_cache(synthetic_root, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = run_cli(*cli_args(synthetic_root, tmp_path / "mine", "--overwrite"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert error_lines(result) and "not an invcache cache" in result.stderr
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # and no lock file left beside it


def test_overwrite_refuses_home_and_the_filesystem_root(synthetic_root, tmp_path, monkeypatch, no_rmtree):
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(UsageError, match="the home directory"):
        extract(settings_for(synthetic_root, home, overwrite=True))
    with pytest.raises(UsageError, match="the filesystem root"):
        extract(settings_for(synthetic_root, "/", overwrite=True))
    assert (home / "docs").is_dir()


def test_overwrite_still_replaces_a_cache(synthetic_root, reference, tmp_path):
    out = tmp_path / "cache"
    extract(settings_for(synthetic_root, out, layers="enc.*", limit=4))
    extract(settings_for(synthetic_root, out, overwrite=True))
    assert_same_arrays(reference, out)


# -- 9. OS errors -----------------------------------------------------------------------------


def test_an_out_path_that_is_a_file_exits_2_in_one_line(synthetic_root, tmp_path):
    (tmp_path / "a-file").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        result = run_cli(*cli_args(synthetic_root, tmp_path / "a-file", *extra))
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert error_lines(result) and "not an invcache cache" in result.stderr
        assert (tmp_path / "a-file").read_text() == "keep me"


# Tests run as root, where a chmod'ed folder does not refuse anything. These locations refuse root too:
# a path through a regular file (ENOTDIR: no permission bit involved) and sysfs, which creates no files
# for anyone (EACCES; EROFS where /sys is mounted read-only, as in most containers).
@pytest.mark.parametrize("where", ["under-a-file", "sysfs"])
def test_a_location_that_cannot_be_written_is_one_line_naming_it(synthetic_root, tmp_path, where):
    if where == "sysfs":
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no sysfs here")
        out, named = Path("/sys/invcache-test-cache"), "/sys/"
    else:
        (tmp_path / "a-file").write_text("keep me")
        out, named = tmp_path / "a-file" / "sub" / "cache", str(tmp_path / "a-file")
    result = run_cli(*cli_args(synthetic_root, out))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert error_lines(result) and named in result.stderr and "lock file of the cache" in result.stderr
    assert not out.exists()


def test_a_file_url_is_the_local_path_it_names(synthetic_root, reference, tmp_path):
    result = extract(settings_for(synthetic_root, (tmp_path / "cache").as_uri()))
    assert result.cache == str(tmp_path / "cache")
    assert_same_arrays(reference, tmp_path / "cache")
    with pytest.raises(UsageError, match="file:///path/to/cache"):
        extract(settings_for(synthetic_root, "file://elsewhere/cache"))


# The shard writer's file write fails with ENOSPC for every shard after shard 0, leaving a partial file.
FULL_DISK = """
import errno, os
import invcache.cache.shard_codec as codec
from invcache.cli import main

class FullDisk:
    def __init__(self, path):
        self.file = open(path, "wb")
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.file.close()
    def writelines(self, pieces):
        self.file.write(b"\\0" * 7)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

codec.open = lambda path, mode="r": open(path, mode) if "/c/0/" in str(path) else FullDisk(path)
main()
"""


def test_a_full_disk_mid_run_is_one_line_and_the_rerun_resumes_identically(synthetic_root, reference, tmp_path):
    out = tmp_path / "cache"
    full = subprocess.run([sys.executable, "-c", FULL_DISK, *cli_args(synthetic_root, out)], capture_output=True,
                          text=True, timeout=300)
    assert full.returncode == 1
    (line,) = error_lines(full)
    assert line.startswith(f"invcache: error: {out}: No space left on device") and "rerun the same command" in line
    complete = Cache.open(out).complete_shards()
    assert complete[0] and not complete[1:].any()
    assert list(out.rglob("*.partial")) and not lock_path(out).exists()

    again = extract(settings_for(synthetic_root, out))  # space freed: the same command
    assert again.shards_skipped == 1 and again.shards_written == 2
    assert_same_arrays(reference, out)
    assert verify_cache(str(out)) == [] and not list(out.rglob("*.partial"))


# -- 10. sizes --------------------------------------------------------------------------------


def test_a_shard_size_beyond_the_image_count_is_clamped_and_the_same_command_resumes(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="invcache")
    settings = ExtractSettings(split="val2017", source="synthetic", synthetic_images=24, workspace=tmp_path,
                               model="detr-tiny", weights="random:0", size=SIZE, batch_size=2, num_workers=0,
                               shard_size=100_000)
    result = extract(settings)
    cache = Cache.open(result.cache)
    assert result.images == 24 and cache.shard_size == 24 and cache.num_shards == 1
    assert cache.attrs["settings"]["shard_size"] == 100_000  # what was asked is recorded, as provenance
    for tap in cache.taps:
        array = cache.array(tap)
        assert array.shards[0] == 24, tap
        (shard_file,) = [p for p in (Path(result.cache) / S.array_path(tap) / "c").rglob("*") if p.is_file()]
        # 24 images and an index of 24 entries (388 bytes), not of 100 000 (1.6 MB)
        assert shard_file.stat().st_size < array.nbytes + 2048, tap
    estimate = re.search(r"disk estimate: ([\d.]+) (kB|MB) for 24 image\(s\)", caplog.text)
    assert estimate and float(estimate[1]) * {"kB": 1e3, "MB": 1e6}[estimate[2]] < 2e6, caplog.text  # not 100 000

    again = extract(settings)
    assert again.shards_written == 0 and again.shards_skipped == 1


def test_the_estimate_counts_every_shard_index():
    shapes = {"enc.0": (6, 64), "input": (64, 96, 3)}
    data = (6 * 64 * 2 + 4 + 64 * 96 * 3 + 4) * 10  # raw rows, each chunk with its crc32c
    # 10 images in shards of 4: three shards, each with a 4-entry index and its checksum, per tap
    assert estimate_bytes(shapes, 10, 4) == data + 3 * (16 * 4 + 4) * 2
    # an index sized for 100 000 images per shard dwarfs the data: the estimate says so
    assert estimate_bytes(shapes, 10, 100_000) > 2 * 1_600_000


@pytest.mark.parametrize("n, text", [(0, "0 B"), (999, "999 B"), (1_500, "1.5 kB"), (1_420_000, "1.4 MB"),
                                     (12_300_000_000, "12.3 GB"), (4.2e12, "4.2 TB")])
def test_sizes_are_written_in_adaptive_units(n, text):
    assert format_bytes(n) == text


def test_the_refusal_for_short_disk_uses_adaptive_units(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setattr(run.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**6, 10**6 - 10, 10))
    with pytest.raises(run.InvcacheError, match=r"need about [\d.]+ kB, 10 B free"):
        extract(settings_for(synthetic_root, tmp_path / "cache", limit=4))
    assert not (tmp_path / "cache").exists() and not lock_path(tmp_path / "cache").exists()
