"""``extract`` (all taps written) vs the bare forward pass over the same batches (target ratio ≥ 0.9).

Both passes read the same synthetic split through the same DataLoader settings; the bare
pass runs the forward with every tap requested and keeps nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import report, setup, synthetic_split  # noqa: E402

from invcache.data import open_split, parse_size  # noqa: E402
from invcache.extraction import ExtractSettings, extract  # noqa: E402
from invcache.extraction.loop import loader_batches  # noqa: E402
from invcache.forward import forward_taps, resolve_amp  # noqa: E402
from invcache.models import build_detr  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="detr-tiny")
    parser.add_argument("--size", default="128x160")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--distinct", type=int, default=32, help="Distinct JPEG files behind the images.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup(args.threads)
    size = parse_size(args.size)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthetic_split(root / "coco", args.images, args.distinct, (size[0], size[0] * 3 // 2),
                        (size[1], size[1] * 3 // 2))
        dataset = open_split("coco", "val2017", coco_root=root / "coco", size=size)
        model = build_detr(args.model, "random:0", device=device)
        taps = model.config.select_taps("all")
        amp = resolve_amp(None, device)

        def bare() -> float:
            start = time.perf_counter()
            batches = loader_batches(dataset, list(range(len(dataset))), args.batch_size, args.num_workers)
            for batch in batches:
                forward_taps(model, batch["input"], taps, amp)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        def full(run: int) -> float:
            settings = ExtractSettings(
                split="val2017", coco_root=root / "coco", out=root / f"cache{run}", model=args.model,
                weights="random:0", size=size, batch_size=args.batch_size, num_workers=args.num_workers,
                device=args.device, shard_size=args.shard_size, writers=args.writers,
            )
            start = time.perf_counter()
            extract(settings)
            return time.perf_counter() - start

        bare()  # warm-up: kernels, allocator, page cache
        bare_s = min(bare() for _ in range(2))
        full(0)
        full_s = min(full(run) for run in (1, 2))
    report(
        "extract_overhead", model=args.model, size=args.size, images=args.images, batch_size=args.batch_size,
        device=str(device), bare_img_s=round(args.images / bare_s, 2), extract_img_s=round(args.images / full_s, 2),
        ratio=round(bare_s / full_s, 3), target=0.9,
    )


if __name__ == "__main__":
    main()
