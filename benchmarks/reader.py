"""Cache reader (shuffled batches of 128 of one tap) against what it could reach.

The same activations are stored twice: as ``enc.6``, which the cache stores without a compressor
(:data:`invcache.cache.schema.UNCOMPRESSED`), and as ``backbone.c5``, which keeps Blosc zstd.
The reader is ``CacheBatches``, as training uses it (``--threads`` decode threads, batches gathered
into preallocated buffers). The uncompressed tap is compared with a raw np.memmap gather of the same
bytes (``ratio``, target ≥ 0.5), and with that gather followed by a crc32c of every gathered row
in ``--threads`` threads (``ratio_to_checked_memmap``: what checking every byte read, as the reader
does and no memmap does, costs a simple reader); the compressed one with the codec's own decode
speed on the same
chunks (``ratio_to_codec``, target ≥ 0.8): numcodecs' Blosc decompressing every stored chunk in
``--threads`` threads (Blosc releases the GIL), and nothing else. Two more figures say where the
time goes: ``decode``, every shard decoded whole by ``Cache.read_shard`` (file read, crc32c of every
chunk, the codec) in ``--threads`` threads with nothing else, which bounds any reader built on it
(``ratio_to_decode``); and the per-sample ``CacheSamples`` of before, with the same decode threads
and, with ``--num-workers`` above 0, through a DataLoader with that many worker processes. All read
a warm page cache; each figure is the best of three epochs, and each reader is one
``CacheBatches`` for all of them (``set_epoch``), as training uses it, so its buffers are reused.
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
from crc32c import crc32c

sys.path.insert(0, str(Path(__file__).parent))
from common import report, setup  # noqa: E402
from writer import activations  # noqa: E402

from invcache.cache import schema as S  # noqa: E402
from invcache.cache.batches import CacheBatches  # noqa: E402
from invcache.cache.reader import CacheSamples  # noqa: E402
from invcache.cache.shard_codec import ShardCodec  # noqa: E402
from invcache.cache.store import Cache  # noqa: E402

RAW, COMPRESSED = "enc.6", "backbone.c5"  # the same rows, stored without and with a compressor
REPEATS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="decode threads of the readers, threads of the codec")
    parser.add_argument("--num-workers", type=int, default=2,
                        help="DataLoader workers of the CacheSamples baseline (0: that baseline is not run)")
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
        location = str(root / "cache")

        def memmap_epoch(_: int) -> float:
            order = rng.permutation(args.images)
            started = time.perf_counter()
            for i in range(0, args.images, args.batch_size):
                torch.from_numpy(raw[np.sort(order[i:i + args.batch_size])])
            return time.perf_counter() - started

        def checked_memmap_epoch(_: int) -> float:
            """The memmap gather, each gathered row then checked with crc32c in ``--threads`` threads: what a reader
            that checks every byte it reads could not beat."""
            order = rng.permutation(args.images)
            started = time.perf_counter()
            with ThreadPoolExecutor(args.threads) as pool:
                for i in range(0, args.images, args.batch_size):
                    batch = raw[np.sort(order[i:i + args.batch_size])]
                    for _ in pool.map(crc32c, batch, chunksize=max(1, len(batch) // args.threads)):
                        pass
                    torch.from_numpy(batch)
            return time.perf_counter() - started

        codec = ShardCodec(cache.array(COMPRESSED))
        assert codec.blosc is not None and ShardCodec(cache.array(RAW)).blosc is None
        chunks = [chunk for s in range(cache.num_shards) for chunk in stored_chunks(codec, root / "cache", s)]

        def codec_pass(_: int) -> float:
            started = time.perf_counter()
            with ThreadPoolExecutor(args.threads) as pool:
                for _ in pool.map(codec.blosc.decode, chunks, chunksize=16):
                    pass
            return time.perf_counter() - started

        def decode_pass(tap: str) -> float:
            reader = Cache.open(location)
            started = time.perf_counter()
            with ThreadPoolExecutor(args.threads) as pool:
                for _ in pool.map(lambda s: reader.read_shard(tap, s, complete=True), range(reader.num_shards)):
                    pass
            return time.perf_counter() - started

        readers = {tap: CacheBatches(location, [tap], args.batch_size, seed=0, decode_threads=args.threads)
                   for tap in (RAW, COMPRESSED)}

        def batches_epoch(tap: str, epoch: int) -> float:
            batches = readers[tap]  # one reader for every epoch, as training uses it (its buffers are reused)
            batches.set_epoch(epoch)
            started = time.perf_counter()
            count = sum(len(batch[tap]) for batch in batches)
            assert count == args.images
            return time.perf_counter() - started

        def samples_epoch(tap: str, epoch: int, workers: int) -> float:
            samples = CacheSamples(location, [tap], seed=0, epoch=epoch, decode_threads=1 if workers else args.threads)
            loader = torch.utils.data.DataLoader(samples, batch_size=args.batch_size, num_workers=workers)
            started = time.perf_counter()
            count = sum(len(batch[tap]) for batch in loader)
            assert count == args.images
            return time.perf_counter() - started

        def best(run) -> float:
            return min(run(epoch) for epoch in range(REPEATS))

        memmap_epoch(-1)
        seconds = {"memmap": best(memmap_epoch), "checked_memmap": best(checked_memmap_epoch),
                   "codec": best(codec_pass)}
        for tap, name in ((RAW, "raw"), (COMPRESSED, "compressed")):
            seconds[f"{name}_decode"] = best(lambda _, tap=tap: decode_pass(tap))
            seconds[f"{name}_batches"] = best(lambda epoch, tap=tap: batches_epoch(tap, epoch))
            seconds[f"{name}_samples_threads"] = best(lambda epoch, tap=tap: samples_epoch(tap, epoch, 0))
            if args.num_workers:
                seconds[f"{name}_samples_workers"] = best(
                    lambda epoch, tap=tap: samples_epoch(tap, epoch, args.num_workers))
    nbytes = args.images * shard[0].nbytes

    def ratio(numerator: str, denominator: str) -> float:
        return round(seconds[numerator] / seconds[denominator], 3)

    report("reader", images=args.images, batch_size=args.batch_size, threads=args.threads,
           num_workers=args.num_workers, mb_s={name: round(nbytes / value / 1e6, 1) for name, value in seconds.items()},
           ratio=ratio("memmap", "raw_batches"), target=0.5,
           ratio_to_checked_memmap=ratio("checked_memmap", "raw_batches"),
           ratio_to_codec=ratio("codec", "compressed_batches"), target_to_codec=0.8,
           ratio_to_decode={"raw": ratio("raw_decode", "raw_batches"),
                            "compressed": ratio("compressed_decode", "compressed_batches")},
           before={"ratio": ratio("memmap", "raw_samples_threads"),
                   "ratio_to_codec": ratio("codec", "compressed_samples_threads")})


def stored_chunks(codec: ShardCodec, root: Path, shard: int) -> list[bytes]:
    """The compressed chunks of one shard file, without their crc32c: what the codec decodes."""
    data = (root / codec._key(shard)).read_bytes()
    index = np.frombuffer(data[-codec.chunks_per_shard * 16 - 4:-4], dtype="<u8").reshape(-1, 2)
    return [data[int(offset):int(offset + length) - 4] for offset, length in index if offset != np.iinfo(np.uint64).max]


if __name__ == "__main__":
    main()
