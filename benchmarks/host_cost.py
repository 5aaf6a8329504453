"""The host's CPU work per image on the GPU path, with a no-op model (target ≤ 20 CPU-ms per image).

SPEC §8: everything but DETR and JPEG decoding — the copies, the codecs of every tap and of ``input``,
the checksums, the writes — measured with a model that does nothing, so that what the host spends per
image shows alone; 16 cores then feed 600 img/s if it is at most 20 CPU-ms.

The images are the bundled photographs (scikit-image's and matplotlib's), decoded and resized to
480×640 before the timing starts (on the GPU path that is the GPU's work). The taps are DETR-R50's
(``random:0``) own outputs for those photographs, computed once and handed out again by the no-op
model, so every codec sees real activations. The loop is invcache's extraction loop
(``run_extraction``: placing rows into shards, the shard writers); normalizing the images, which the
GPU does before DETR, is skipped. The total is the process's CPU time (every thread, user and system)
over the loop; the stages are the thread CPU time spent in each function, whichever thread ran it.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import photographs, report, setup  # noqa: E402

import invcache.forward  # noqa: E402
from invcache import build_detr, forward_taps  # noqa: E402
from invcache.cache import schema as S  # noqa: E402
from invcache.cache import shard_codec  # noqa: E402
from invcache.cache.codec_choice import choose_uncompressed  # noqa: E402
from invcache.cache.store import Cache  # noqa: E402
from invcache.data import parse_size  # noqa: E402
from invcache.extraction import loop  # noqa: E402
from invcache.taps import INPUT  # noqa: E402


class NoOpModel(torch.nn.Module):
    """Hands out precomputed taps for each batch (cycling over the photographs' own), computing nothing."""

    def __init__(self, taps: dict[str, torch.Tensor], config) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # forward_taps reads the device from a parameter
        self.taps, self.config, self.calls = taps, config, 0

    def forward(self, images: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        count = len(next(iter(self.taps.values())))
        rows = (torch.arange(len(images)) + self.calls * len(images)) % count
        self.calls += 1
        return {t: self.taps[t][rows] for t in taps}


class StageClock:
    """Exclusive thread CPU seconds per stage (a stage's time without the stages it calls), from wrappers around
    the loop's functions, in whichever thread runs them."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock, self._local = threading.Lock(), threading.local()

    def wrap(self, owner, name: str, stage) -> None:
        function = getattr(owner, name)

        def timed(*args, **kwargs):
            label = stage(*args) if callable(stage) else stage
            stack = self._local.__dict__.setdefault("stack", [])
            stack.append(0.0)  # CPU time of the stages this call runs
            start = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.thread_time() - start
                inner = stack.pop()
                with self._lock:
                    self.seconds[label] += elapsed - inner
                if stack:
                    stack[-1] += elapsed

        setattr(owner, name, timed)


def tap_group(path: str) -> str:
    """A stage label per kind of tap: ``input``, every encoder layer together, every decoder layer together, heads."""
    kind = path.split("/")[0]
    return "input (JPEG XL)" if path == INPUT else f"{kind}.*" if kind in ("enc", "dec") else path.replace("/", ".")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="detr-r50")
    parser.add_argument("--size", default="480x640")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--writers", type=int, default=2)
    args = parser.parse_args()
    setup()
    size = parse_size(args.size)
    pictures = torch.from_numpy(np.stack(photographs(*size)))
    model = build_detr(args.model, "random:0")
    taps = model.config.select_taps("all")
    real = {t: v.to(torch.float16) if t != INPUT else v for t, v in forward_taps(model, pictures, taps).items()}
    noop = NoOpModel({t: v for t, v in real.items() if t != INPUT}, model.config)

    def batches():
        for start in range(0, args.images, args.batch_size):
            count = min(args.batch_size, args.images - start)
            rows = torch.arange(start, start + count)
            yield {"input": pictures[rows % len(pictures)].clone(), "image_id": rows + 1, "row": rows,
                   "valid": torch.ones(count, dtype=torch.bool), "orig_size": torch.tensor([list(size)] * count),
                   "error": [""] * count}

    clock = StageClock()
    clock.wrap(loop.ShardAssembler, "place", "place rows into shards (copies)")
    clock.wrap(shard_codec.ShardCodec, "_encode_rows", lambda codec, rows: f"encode {tap_group(codec.array.path)}")
    clock.wrap(shard_codec.ShardCodec, "write", "write shard files (index, file writes)")
    clock.wrap(Cache, "write_shard", "bookkeeping arrays, digests, flags")
    clock.wrap(loop.ShardWriters, "_write", "mean-image sum")
    clock.wrap(shard_codec, "crc32c", "crc32c checksums")
    invcache.forward.normalize = lambda images: images  # the GPU's work on the GPU path
    with tempfile.TemporaryDirectory() as tmp:
        # the codecs extraction would choose for these taps (measured on the batch, as on a split's first)
        cache = Cache.create(Path(tmp) / "cache", num_images=args.images, shard_size=args.shard_size,
                             tap_shapes={t: tuple(v.shape[1:]) for t, v in real.items()},
                             uncompressed=choose_uncompressed({t: v.numpy() for t, v in real.items()}))
        stream = list(batches())
        before, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        loop.run_extraction(cache, iter(stream), list(range(1, args.images + 1)), noop, taps, None, args.writers)
        after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall
        stored = sum(f.stat().st_size for f in Path(tmp, "cache").rglob("*") if f.is_file())
    total = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    stages = {k: round(v / args.images * 1e3, 3) for k, v in sorted(clock.seconds.items())}
    encode = sum(v for k, v in clock.seconds.items() if k.startswith("encode "))
    report("host_cost", model=args.model, size=args.size, images=args.images, batch_size=args.batch_size,
           writers=args.writers, cpu_ms_per_image=round(total / args.images * 1e3, 2),
           ratio=round(total / args.images * 1e3 / 20, 3), target_cpu_ms=20,
           meets_target=total / args.images * 1e3 <= 20, stage_cpu_ms_per_image=stages,
           encode_cpu_ms_per_image=round(encode / args.images * 1e3, 3),
           other_cpu_ms_per_image=round((total - sum(clock.seconds.values())) / args.images * 1e3, 3),
           wall_images_per_s=round(args.images / wall, 1), stored_mb_per_image=round(stored / args.images / 1e6, 3),
           cores_for_600_img_s=round(total / args.images * 600, 2), shards=S.num_shards(args.images, args.shard_size))


if __name__ == "__main__":
    main()
