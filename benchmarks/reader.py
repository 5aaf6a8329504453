"""Cache reader (shuffled batches of 128 of one tap) against what it could reach.

The same activations are stored twice: as ``enc.6``, which the cache stores without a compressor
(:data:`invcache.cache.schema.UNCOMPRESSED`), and as ``backbone.c5``, which keeps Blosc zstd.
The uncompressed tap is compared with a raw np.memmap gather of the same bytes (target ≥ 0.5), the
compressed one with the codec's own decode speed on the same chunks (target ≥ 0.8): numcodecs'
Blosc decompressing every stored chunk, in as many threads as the reader has workers (Blosc
releases the GIL), and nothing else. The reader is ``CacheSamples`` through a DataLoader, as
training uses it (worker processes), and with ``decode_threads`` and no worker process. All read
a warm page cache.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import report, setup  # noqa: E402
from writer import activations  # noqa: E402

from invcache.cache import schema as S  # noqa: E402
from invcache.cache.reader import CacheSamples  # noqa: E402
from invcache.cache.shard_codec import ShardCodec  # noqa: E402
from invcache.cache.store import Cache  # noqa: E402

RAW, COMPRESSED = "enc.6", "backbone.c5"  # the same rows, stored without and with a compressor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()
    setup()
    rng = np.random.default_rng(0)
    shard = activations(rng, args.shard_size, args.tokens, 256)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shapes = {RAW: shard.shape[1:], COMPRESSED: shard.shape[1:]}
        cache = Cache.create(root / "cache", num_images=args.images, tap_shapes=shapes, shard_size=args.shard_size)
        raw = np.memmap(root / "rows.raw", dtype=np.float16, mode="w+", shape=(args.images, *shard.shape[1:]))
        for s in range(cache.num_shards):
            start, stop = cache.shard_bounds(s)
            rows = shard[: stop - start]
            meta = S.empty_bookkeeping(stop - start)
            meta[S.IMAGE_ID][:], meta[S.VALID][:] = np.arange(start, stop), True
            cache.write_shard(s, {RAW: rows, COMPRESSED: rows}, meta)
            raw[start:stop] = rows
        raw.flush()

        def memmap_epoch() -> float:
            order = rng.permutation(args.images)
            started = time.perf_counter()
            for i in range(0, args.images, args.batch_size):
                torch.from_numpy(raw[np.sort(order[i:i + args.batch_size])])
            return time.perf_counter() - started

        def reader_epoch(tap: str, epoch: int, threads: bool = False) -> float:
            samples = CacheSamples(str(root / "cache"), [tap], seed=0, epoch=epoch,
                                   decode_threads=max(args.num_workers, 1) if threads else 1)
            loader = torch.utils.data.DataLoader(samples, batch_size=args.batch_size,
                                                 num_workers=0 if threads else args.num_workers)
            started = time.perf_counter()
            count = sum(len(batch[tap]) for batch in loader)
            assert count == args.images
            return time.perf_counter() - started

        codec = ShardCodec(cache.array(COMPRESSED))
        assert codec.blosc is not None and ShardCodec(cache.array(RAW)).blosc is None
        chunks = [chunk for s in range(cache.num_shards) for chunk in stored_chunks(codec, root / "cache", s)]

        def codec_pass() -> float:
            started = time.perf_counter()
            with ThreadPoolExecutor(max(args.num_workers, 1)) as pool:
                for _ in pool.map(codec.blosc.decode, chunks, chunksize=16):
                    pass
            return time.perf_counter() - started

        memmap_epoch()
        seconds = {"memmap": min(memmap_epoch() for _ in range(3)), "codec": min(codec_pass() for _ in range(3))}
        for tap, name in ((RAW, "raw"), (COMPRESSED, "compressed")):
            seconds[f"{name}_workers"] = min(reader_epoch(tap, e) for e in range(3))
            seconds[f"{name}_threads"] = min(reader_epoch(tap, e, threads=True) for e in range(3))
    nbytes = args.images * shard[0].nbytes
    raw_best = min(seconds["raw_workers"], seconds["raw_threads"])
    compressed_best = min(seconds["compressed_workers"], seconds["compressed_threads"])
    report("reader", images=args.images, batch_size=args.batch_size, num_workers=args.num_workers,
           mb_s={name: round(nbytes / value / 1e6, 1) for name, value in seconds.items()},
           ratio=round(seconds["memmap"] / raw_best, 3), target=0.5,
           ratio_to_codec=round(seconds["codec"] / compressed_best, 3), target_to_codec=0.8)


def stored_chunks(codec: ShardCodec, root: Path, shard: int) -> list[bytes]:
    """The compressed chunks of one shard file, without their crc32c: what the codec decodes."""
    data = (root / codec._key(shard)).read_bytes()
    index = np.frombuffer(data[-codec.chunks_per_shard * 16 - 4:-4], dtype="<u8").reshape(-1, 2)
    return [data[int(offset):int(offset + length) - 4] for offset, length in index if offset != np.iinfo(np.uint64).max]


if __name__ == "__main__":
    main()
