"""Per tap: what Blosc zstd, Blosc lz4 and no compressor achieve on real activations (ratio, decode MB/s).

Extracts ``--layers all`` of a synthetic split with the given model and weights (by default the
embedded default, detr-tiny trained on the synthetic shapes, at the size it was trained at), then
takes each tap's stored rows and encodes every row (one chunk, as the cache stores it) with each
candidate: the cache's Blosc (zstd level 1, byte-shuffled, one block per chunk), the same with lz4,
and the bit-shuffled zstd with Blosc's own block size that earlier versions used; decode speed is
single-threaded over all chunks of the tap, best of three. ``ratio`` is one line's headline: the
smallest zstd ratio among the encoder taps, against the bound below which a tap is stored raw
(:data:`invcache.cache.schema.COMPRESSION_WORTHWHILE`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from numcodecs import Blosc

sys.path.insert(0, str(Path(__file__).parent))
from common import report, setup  # noqa: E402

from invcache.cache import schema as S  # noqa: E402
from invcache.cache.store import Cache  # noqa: E402
from invcache.data import parse_size  # noqa: E402
from invcache.extraction import ExtractSettings, extract  # noqa: E402

CANDIDATES = {  # the cache's Blosc (schema.blosc), its compressor swapped for lz4, and the earlier bit-shuffle
    "zstd": S.blosc(),
    "lz4": Blosc(cname="lz4", clevel=S.BLOSC_CLEVEL, shuffle=Blosc.SHUFFLE, blocksize=S.BLOSC_BLOCKSIZE),
    "zstd_bitshuffle": Blosc(cname="zstd", clevel=1, shuffle=Blosc.BITSHUFFLE),
}


def measure(rows: np.ndarray) -> dict[str, dict[str, float]]:
    # Each row in its own dtype, so Blosc shuffles by the element size (2 bytes for fp16), as the cache does.
    raw = [np.ascontiguousarray(row) for row in rows]
    nbytes = sum(r.nbytes for r in raw)
    figures = {}
    for name, codec in CANDIDATES.items():
        chunks = [codec.encode(r) for r in raw]
        seconds = min(_timed(lambda: [codec.decode(c) for c in chunks]) for _ in range(3))
        figures[name] = {"ratio": round(nbytes / sum(len(c) for c in chunks), 3),
                         "decode_mb_s": round(nbytes / seconds / 1e6, 1)}
    seconds = min(_timed(lambda: [r.tobytes() for r in raw]) for _ in range(3))  # "none": the copy out
    figures["none"] = {"ratio": 1.0, "decode_mb_s": round(nbytes / seconds / 1e6, 1)}
    return figures


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="detr-tiny")
    parser.add_argument("--weights", default="demo")
    parser.add_argument("--size", default="128x160")
    parser.add_argument("--images", type=int, default=32)
    args = parser.parse_args()
    setup()
    with tempfile.TemporaryDirectory() as tmp:
        settings = ExtractSettings(split="shapes-codecs", source="synthetic", synthetic_images=args.images,
                                   workspace=tmp, model=args.model, weights=args.weights, size=parse_size(args.size),
                                   layers="all", shard_size=args.images, batch_size=8, num_workers=0)
        cache = Cache.open(extract(settings).cache)
        taps = {tap: measure(cache.read_shard(tap, 0)) for tap in cache.taps}
    encoder = [figures["zstd"]["ratio"] for tap, figures in taps.items() if tap.startswith("enc.")]
    report("codecs", model=args.model, weights=args.weights, size=args.size, images=args.images, taps=taps,
           ratio=min(encoder), threshold=S.COMPRESSION_WORTHWHILE)


if __name__ == "__main__":
    main()
