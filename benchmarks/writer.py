"""Shard writes of realistic fp16 activations vs a raw np.memmap write of the same bytes (target ratio ≥ 0.6).

Both sides write whole shards of ``--shard-size`` images of ``--taps`` encoder-sized taps
(T×256 fp16, LayerNorm'd values) and are flushed to the OS: zarr through its atomic file
writes, the memmap with ``flush()``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import best_of, report, setup  # noqa: E402

from invcache.cache import schema as S  # noqa: E402
from invcache.cache.store import Cache  # noqa: E402


def activations(rng: np.random.Generator, images: int, tokens: int, channels: int) -> np.ndarray:
    """LayerNorm'd tokens with a low-rank structure, like DETR's encoder outputs."""
    basis = rng.standard_normal((8, channels)).astype(np.float32)
    x = rng.standard_normal((images, tokens, 8)).astype(np.float32) @ basis
    x += 0.5 * rng.standard_normal((images, tokens, channels)).astype(np.float32)
    x = (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)
    return x.astype(np.float16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--taps", type=int, default=4)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    setup()
    rng = np.random.default_rng(0)
    data = {f"enc.{k}": activations(rng, args.shard_size, args.tokens, 256) for k in range(args.taps)}
    images = args.shards * args.shard_size
    total_bytes = sum(a.nbytes for a in data.values()) * args.shards
    meta_rows = np.arange(images)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        def zarr_write() -> None:
            cache = Cache.create(root / "cache", num_images=images,
                                 tap_shapes={t: a.shape[1:] for t, a in data.items()}, shard_size=args.shard_size)

            def one(shard: int, codec_pool) -> None:
                rows = meta_rows[shard * args.shard_size:(shard + 1) * args.shard_size]
                meta = S.empty_bookkeeping(len(rows))
                meta[S.IMAGE_ID][:], meta[S.VALID][:] = rows, True
                cache.write_shard(shard, data, meta, codec_pool)

            with ThreadPoolExecutor(args.writers) as pool, ThreadPoolExecutor(args.writers) as codec_pool:
                list(pool.map(lambda shard: one(shard, codec_pool), range(args.shards)))

        def memmap_write() -> None:
            for tap, array in data.items():
                mm = np.memmap(root / f"{tap}.raw", dtype=np.float16, mode="w+",
                               shape=(images, *array.shape[1:]))
                for shard in range(args.shards):
                    mm[shard * args.shard_size:(shard + 1) * args.shard_size] = array
                mm.flush()
                del mm

        zarr_s = best_of(args.repeats, zarr_write)
        stored = Cache.open(root / "cache").array("enc.0").nbytes_stored() * len(data)
        memmap_s = best_of(args.repeats, memmap_write)
    report(
        "writer",
        images=images, raw_mb=round(total_bytes / 1e6, 1),
        zarr_mb_s=round(total_bytes / zarr_s / 1e6, 1), memmap_mb_s=round(total_bytes / memmap_s / 1e6, 1),
        compression=round(total_bytes / stored, 3), ratio=round(memmap_s / zarr_s, 3), target=0.6,
    )


if __name__ == "__main__":
    main()
