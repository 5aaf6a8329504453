"""Cache reader (shuffled batches of 128 of one tap) vs a raw np.memmap gather of the same bytes (target ≥ 0.5),
and vs the codec's own decode speed on the same chunks (target ≥ 0.8 for a compressed tap).

All three read a warm page cache: the memmap side gathers 128 random rows per batch from a raw
float16 file; the reader side is ``CacheSamples`` through a DataLoader, as training uses it; the
codec side decompresses every stored chunk of the tap with numcodecs' Blosc, in as many threads
as the reader has workers (Blosc releases the GIL), and does nothing else.
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
        cache = Cache.create(root / "cache", num_images=args.images, tap_shapes={"enc.6": shard.shape[1:]},
                             shard_size=args.shard_size)
        raw = np.memmap(root / "enc6.raw", dtype=np.float16, mode="w+", shape=(args.images, *shard.shape[1:]))
        for s in range(cache.num_shards):
            start, stop = cache.shard_bounds(s)
            rows = shard[: stop - start]
            meta = S.empty_bookkeeping(stop - start)
            meta[S.IMAGE_ID][:], meta[S.VALID][:] = np.arange(start, stop), True
            cache.write_shard(s, {"enc.6": rows}, meta)
            raw[start:stop] = rows
        raw.flush()

        def memmap_epoch() -> float:
            order = rng.permutation(args.images)
            started = time.perf_counter()
            for i in range(0, args.images, args.batch_size):
                torch.from_numpy(raw[np.sort(order[i:i + args.batch_size])])
            return time.perf_counter() - started

        def reader_epoch(epoch: int, threads: bool = False) -> float:
            samples = CacheSamples(str(root / "cache"), ["enc.6"], seed=0, epoch=epoch,
                                   decode_threads=max(args.num_workers, 1) if threads else 1)
            loader = torch.utils.data.DataLoader(samples, batch_size=args.batch_size,
                                                 num_workers=0 if threads else args.num_workers)
            started = time.perf_counter()
            count = sum(len(batch["enc.6"]) for batch in loader)
            assert count == args.images
            return time.perf_counter() - started

        codec = ShardCodec(cache.array("enc.6"))
        chunks = [chunk for s in range(cache.num_shards) for chunk in stored_chunks(codec, root / "cache", s)]

        def codec_pass() -> float:
            started = time.perf_counter()
            with ThreadPoolExecutor(max(args.num_workers, 1)) as pool:
                for _ in pool.map(codec.blosc.decode, chunks, chunksize=16):
                    pass
            return time.perf_counter() - started

        memmap_epoch()
        memmap_s = min(memmap_epoch() for _ in range(3))
        reader_s = min(reader_epoch(e) for e in range(3))
        threads_s = min(reader_epoch(e, threads=True) for e in range(3))
        codec_s = min(codec_pass() for _ in range(3))
    nbytes = args.images * shard[0].nbytes
    report("reader", images=args.images, batch_size=args.batch_size, num_workers=args.num_workers,
           reader_mb_s=round(nbytes / reader_s / 1e6, 1), memmap_mb_s=round(nbytes / memmap_s / 1e6, 1),
           codec_mb_s=round(nbytes / codec_s / 1e6, 1), threads_mb_s=round(nbytes / threads_s / 1e6, 1),
           threads_to_codec=round(codec_s / threads_s, 3), ratio=round(memmap_s / reader_s, 3), target=0.5,
           ratio_to_codec=round(codec_s / reader_s, 3), target_to_codec=0.8)


def stored_chunks(codec: ShardCodec, root: Path, shard: int) -> list[bytes]:
    """The compressed chunks of one shard file, without their crc32c: what the codec decodes."""
    data = (root / codec._key(shard)).read_bytes()
    index = np.frombuffer(data[-codec.chunks_per_shard * 16 - 4:-4], dtype="<u8").reshape(-1, 2)
    return [data[int(offset):int(offset + length) - 4] for offset, length in index if offset != np.iinfo(np.uint64).max]


if __name__ == "__main__":
    main()
