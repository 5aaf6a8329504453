"""What a cache holds (``invcache info``) and whether every chunk still verifies (``invcache verify``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

from invcache.cache import schema as S
from invcache.cache.store import Cache, CacheCorruptError


def cache_info(location: str) -> dict:
    cache = Cache.open(location)
    complete = cache.complete_shards()
    rows_done = cache.rows_in(np.flatnonzero(complete))
    arrays = []
    names = [*cache.taps, *S.PER_IMAGE_ARRAYS, *([S.MEAN_IMAGE] if cache.has_mean_image() else [])]
    for name in names:
        array = cache.array(name)
        per_row = int(np.prod(array.shape[1:])) * (array.dtype.itemsize if name != S.FAILURE else 0)
        stored = array.nbytes_stored()
        # mean_image is one (H, W, 3) image, not a row per image
        raw = array.nbytes if name == S.MEAN_IMAGE else per_row * rows_done
        arrays.append({
            "name": S.array_path(name), "shape": list(array.shape), "dtype": str(array.dtype),
            "stored_bytes": stored, "raw_bytes": raw, "ratio": raw / stored if stored and raw else 0.0,
        })
    codec = cache.attrs["codec"]
    tap_bytes = sum(a["stored_bytes"] for a in arrays[: len(cache.taps)])
    summary = {
        "arrays": arrays,
        "num_images": cache.num_images,
        "num_shards": cache.num_shards,
        "complete_shards": int(complete.sum()),
        "stored_bytes_per_image": tap_bytes / rows_done if rows_done else 0.0,
        "codec": codec,
        "failures": cache.failures(),
        "attrs": cache.attrs,
    }
    if codec.get("keepbits") is not None:
        # BitRound rounds to nearest on `keepbits` mantissa bits: at most half a unit in the last kept
        # place. With the rounding error uniform and mantissas log-uniform (Benford), the expected
        # relative error is that bound times 1/(2 ln 2) ≈ 0.72, halved: ≈ 0.36 × bound.
        bound = 2.0 ** -(codec["keepbits"] + 1)
        summary["keepbits_error"] = {"max_relative": bound, "expected_mean_relative": bound / (4 * math.log(2))}
    return summary


def verify_cache(location: str, threads: int = 4) -> list[str]:
    """Check the metadata, then read every chunk of every array; one message per problem found.

    Every problem is collected, not only the first: the metadata's (each naming its file), the
    completion flags against the root ``complete`` attribute, every bookkeeping chunk a complete
    shard must have, every tap's shard file (each image's crc32c, and the whole file's against
    the digest recorded when its shard completed) and the mean image. Only damage is listed
    (``store.CORRUPTION_ERRORS``, missing files and chunks, bad metadata); any other error
    propagates, and so does a root that is no cache or cannot be read at all.
    """
    cache = Cache.open(location, check=False)
    metadata = cache.check_metadata()
    problems = list(metadata.problems)
    if not metadata.shards_known:
        return problems  # without a sound shard layout, reading shards would only add noise
    readable = [name for name in [*cache.taps, *S.PER_IMAGE_ARRAYS, *S.PER_SHARD_ARRAYS]
                if name not in metadata.unreadable]

    def read(what: Callable[[], object]) -> object:
        try:
            return what()
        except CacheCorruptError as exc:
            problems.append(str(exc))
            return None

    # A shard whose flag cannot be read counts as incomplete: its chunks' checksums are still checked,
    # missing ones are not damage. One whose digests cannot be read has its files checked without them.
    complete: list[bool] = []
    digests: list[np.ndarray | None] = []
    incomplete: list[str] = []  # shards whose flag reads False (not those whose flag cannot be read)
    for shard in range(cache.num_shards):
        flag = read(partial(cache.read_shard, S.SHARD_COMPLETE, shard)) if S.SHARD_COMPLETE in readable else None
        complete.append(flag is not None and bool(flag[0]))
        if flag is not None and not flag[0]:
            incomplete.append(str(shard))
        row = read(partial(cache.read_shard, S.SHARD_DIGEST, shard, True)) if complete[-1] and \
            S.SHARD_DIGEST in readable else None
        digests.append(None if row is None else row[0])
    if cache.attrs.get("complete") is True and incomplete:
        problems.append(f"{location.rstrip('/')}/zarr.json: complete is true, but shard_complete does not mark "
                        f"shards {', '.join(incomplete)} complete")

    def check(job: tuple[str, int]) -> str | None:
        name, shard = job
        try:
            if name in cache.taps:
                row = digests[shard]
                digest = None if row is None else int(row[cache.taps.index(name)])
                cache.decode_shard(name, shard, complete[shard], digest)
            else:
                cache.read_shard(name, shard, complete[shard])
        except CacheCorruptError as exc:
            return str(exc)
        return None

    names = [name for name in [*cache.taps, *S.PER_IMAGE_ARRAYS] if name in readable]
    jobs = [(name, shard) for name in names for shard in range(cache.num_shards)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        problems += [p for p in pool.map(check, jobs) if p]
    if read(cache.has_mean_image):
        read(lambda: cache.mean_image)
    return problems
