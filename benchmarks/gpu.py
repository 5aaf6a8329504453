"""DETR-R50 at 480×640 on one GPU: forward-only and full extraction images/s, bf16, batch sweep (target ≥ 600).

One command on a single-GPU machine, a few minutes:

    python benchmarks/gpu.py

Forward-only runs the model with every tap on a batch already on the device. Extraction
is ``invcache extract`` end to end on a synthetic split of COCO-sized JPEGs (decode,
resize, forward, host copies, compression, writes), timed from the first batch to the
last shard on disk.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import report, synthetic_split  # noqa: E402

from invcache.data import open_split, parse_size  # noqa: E402
from invcache.extraction import ExtractSettings, extract  # noqa: E402
from invcache.forward import forward_taps, resolve_amp  # noqa: E402
from invcache.models import build_detr  # noqa: E402


def forward_only(model, images: torch.Tensor, taps: list[str], iterations: int, amp) -> float:
    def sync() -> None:
        if images.is_cuda:
            torch.cuda.synchronize()

    for _ in range(3):
        forward_taps(model, images, taps, amp)
    sync()
    start = time.perf_counter()
    for _ in range(iterations):
        forward_taps(model, images, taps, amp)
    sync()
    return len(images) * iterations / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="detr-r50")
    parser.add_argument("--size", default="480x640")
    parser.add_argument("--images", type=int, default=6144)
    parser.add_argument("--distinct", type=int, default=512, help="Distinct JPEG files behind the images.")
    parser.add_argument("--batch-sizes", default="32,64,128")
    parser.add_argument("--num-workers", type=int, default=12)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--work-dir", default=None, help="Where the synthetic data and caches go [a temp dir].")
    parser.add_argument("--device", default="cuda", help="cpu runs the same code in fp32 (CI's smoke run).")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: no CUDA device here (pass --device cpu for a smoke run)")
    amp = resolve_amp(None, torch.device(args.device))
    size = parse_size(args.size)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        synthetic_split(root / "coco", args.images, args.distinct, (427, 640), (480, 640))
        generate_s = time.perf_counter() - started
        dataset = open_split("coco", "val2017", coco_root=root / "coco", size=size)
        model = build_detr(args.model, "random:0", device=args.device)
        taps = model.config.select_taps("all")
        forward = {}
        for bs in batch_sizes:
            batch = torch.stack([dataset[i % len(dataset)]["input"] for i in range(bs)]).to(args.device)
            # as many images as the extraction runs, so a small --images makes a small smoke run
            forward[bs] = round(forward_only(model, batch, taps, max(2, args.images // bs), amp), 1)
        del model

        extraction = {}
        for bs in batch_sizes:
            marks = {}
            settings = ExtractSettings(
                split="val2017", coco_root=root / "coco", out=root / "cache", model=args.model, weights="random:0",
                size=size, batch_size=bs, num_workers=args.num_workers, writers=args.writers, device=args.device,
                shard_size=args.shard_size, overwrite=True,
            )
            extract(settings, on_plan=lambda total: marks.setdefault("start", time.perf_counter()))
            extraction[bs] = round(args.images / (time.perf_counter() - marks["start"]), 1)
    best_forward, best_extract = max(forward.values()), max(extraction.values())
    report(
        "gpu", model=args.model, size=args.size, images=args.images, amp=str(amp).removeprefix("torch."), taps="all",
        num_workers=args.num_workers, writers=args.writers, synthetic_data_s=round(generate_s, 1),
        forward_img_s=forward, extract_img_s=extraction, best_forward_img_s=best_forward,
        best_extract_img_s=best_extract, extract_vs_forward=round(best_extract / best_forward, 3), target=600,
    )


if __name__ == "__main__":
    main()
