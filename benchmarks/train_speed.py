"""Training steps/s from the cache vs recomputing DETR on every step, as the authors' code does.

Targets: ≥ 3× for E⁻¹ and D⁻¹, ≥ 20× for P⁻¹ (same module, batch size and device). The
recompute side loads and resizes the images, runs the frozen DETR for the module's input
and target taps, then takes the same optimizer step; the cache side reads both taps with
``CacheBatches``, as training does (``--decode-threads`` threads; ``--num-workers`` are the
recompute side's DataLoader workers).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import report, setup  # noqa: E402

from invcache import taps as T  # noqa: E402
from invcache.cache.batches import CacheBatches  # noqa: E402
from invcache.cache.store import Cache  # noqa: E402
from invcache.data import generate_coco, open_split, parse_size  # noqa: E402
from invcache.extraction import ExtractSettings, extract  # noqa: E402
from invcache.forward import forward_taps, resolve_amp  # noqa: E402
from invcache.inverse import LEARNING_RATES, build_inverse, make_spec  # noqa: E402
from invcache.models import build_detr  # noqa: E402
from invcache.training.loop import train_step  # noqa: E402


def steps_per_second(batches, step, steps: int) -> float:
    batches = iter(batches)
    step(next(batches))  # warm-up
    started = time.perf_counter()
    for batch in itertools.islice(batches, steps):
        step(batch)
    return steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="detr-r50")
    parser.add_argument("--size", default="128x160")
    parser.add_argument("--modules", default="backbone-inv,encoder-inv,decoder-inv,head-inv")
    parser.add_argument("--width", default="small", help="B⁻¹ width: small for CPUs, full on a GPU.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup(args.threads)
    size, device = parse_size(args.size), torch.device(args.device)
    amp = resolve_amp(None, device)
    images = args.batch_size * (args.steps + 2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_coco(root / "coco", "train2017", num_images=images)
        extract(ExtractSettings(split="train2017", coco_root=root / "coco", out=root / "cache", model=args.model,
                                weights="random:0", size=size, batch_size=args.batch_size, num_workers=0,
                                device=args.device, shard_size=args.batch_size * 2))
        attrs = Cache.open(root / "cache").attrs
        detr = build_detr(args.model, "random:0", device=device)
        dataset = open_split("coco", "train2017", coco_root=root / "coco", size=size)
        figures = {}
        for name in args.modules.split(","):
            spec = make_spec(name, attrs, width=args.width)
            taps = [*spec.inputs, spec.target]
            module = build_inverse(spec).to(device)
            optimizer = torch.optim.Adam(module.parameters(), lr=LEARNING_RATES[name])

            scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

            def step(batch: dict) -> None:
                batch = {t: batch[t].to(device) for t in taps}
                train_step(spec, module, optimizer, scaler, batch, amp)
                if device.type == "cuda":
                    torch.cuda.synchronize()

            def recompute_step(batch: dict) -> None:
                # outputs of inference mode must be cloned before autograd may use them
                recomputed = {t: v.clone() for t, v in forward_taps(detr, batch[T.INPUT], taps, amp).items()}
                step(recomputed | {T.INPUT: batch[T.INPUT]})

            cached = CacheBatches(str(root / "cache"), taps, args.batch_size, decode_threads=args.decode_threads,
                                  device=device)
            loaded = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                                                 shuffle=True)
            from_cache = steps_per_second(cached, step, args.steps)
            recomputing = steps_per_second(loaded, recompute_step, args.steps)
            figures[name] = {"cache_steps_s": round(from_cache, 2), "recompute_steps_s": round(recomputing, 2),
                             "ratio": round(from_cache / recomputing, 2)}
    targets = {"encoder-inv": 3, "decoder-inv": 3, "head-inv": 20}
    report("train_speed", model=args.model, size=args.size, batch_size=args.batch_size, device=str(device),
           modules=figures, targets=targets,
           ratio=min(f["ratio"] for f in figures.values()))


if __name__ == "__main__":
    main()
