"""What a cache holds (``invcache info``) and whether every chunk still verifies (``invcache verify``)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

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
    """Read every chunk of every array; one message per (array, shard) that fails to verify.

    Only damage is listed (``store.CORRUPTION_ERRORS``); any other error propagates.
    """
    cache = Cache.open(location)
    problems = []
    complete = []
    for shard in range(cache.num_shards):
        try:
            complete.append(bool(cache.read(S.SHARD_COMPLETE, shard, shard + 1)[0]))
        except CacheCorruptError as exc:
            problems.append(str(exc))
            complete.append(False)  # unknown: its chunks' checksums are still checked, missing ones are not damage

    def check(job: tuple[str, int]) -> str | None:
        name, shard = job
        try:
            cache.read_shard(name, shard, complete[shard])
        except CacheCorruptError as exc:
            return str(exc)
        return None

    jobs = [(name, shard) for name in [*cache.taps, *S.PER_IMAGE_ARRAYS] for shard in range(cache.num_shards)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        problems += [p for p in pool.map(check, jobs) if p]
    if cache.has_mean_image():
        try:
            cache.mean_image
        except CacheCorruptError as exc:
            problems.append(str(exc))
    return problems
