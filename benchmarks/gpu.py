"""DETR-R50 at 480×640 on one GPU: forward-only and full extraction images/s, bf16, batch sweep (target ≥ 600).

One command on a single-GPU machine, a few minutes:

    python benchmarks/gpu.py

Forward-only runs the model with every tap on a batch already on the device. Extraction
is ``invcache extract`` end to end (decode, resize, forward, host copies, compression,
writes) on JPEGs of the bundled photographs (``--images-from photographs``, the default) or
of the synthetic shapes, timed from the first batch to the last shard on disk, once per
decode path (``--decodes cpu,device``: DataLoader workers with PIL, or nvJPEG in batches on
the GPU). Beside each extraction: its peak GPU memory (``torch.cuda.max_memory_allocated``),
how busy the GPU was (nvidia-smi's utilization, sampled every 0.2 s) and how many host cores
the process kept busy (its CPU time, workers included, over the wall time).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import photograph_split, report, synthetic_split  # noqa: E402

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


class GpuBusy:
    """Samples the GPU's utilization (nvidia-smi, every ``period`` s) while the block runs; ``mean`` in percent."""

    def __init__(self, period: float = 0.2) -> None:
        self.period, self.samples = period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.period):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return  # no nvidia-smi (a CPU smoke run): no figure

    def __enter__(self) -> GpuBusy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (DataLoader workers), user and system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="detr-r50")
    parser.add_argument("--size", default="480x640")
    parser.add_argument("--images", type=int, default=6144)
    parser.add_argument("--distinct", type=int, default=512, help="Distinct JPEG files behind the images.")
    parser.add_argument("--batch-sizes", default="64,128")
    parser.add_argument("--decodes", default="cpu,device", help="Decode paths to extract with (--decode).")
    parser.add_argument("--images-from", choices=("photographs", "synthetic"), default="photographs")
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
        if args.images_from == "photographs":
            photograph_split(root / "coco", args.images)
        else:
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

        extraction, profile = {}, {}
        for decode in args.decodes.split(","):
            for bs in batch_sizes:
                marks = {}
                settings = ExtractSettings(
                    split="val2017", coco_root=root / "coco", out=root / "cache", model=args.model, weights="random:0",
                    size=size, batch_size=bs, num_workers=args.num_workers, writers=args.writers, device=args.device,
                    shard_size=args.shard_size, overwrite=True, decode=decode,
                )
                if args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                cpu_before = cpu_seconds()
                with GpuBusy() as busy:
                    extract(settings, on_plan=lambda total: marks.setdefault("start", time.perf_counter()))
                wall = time.perf_counter() - marks["start"]
                key = f"{decode}/bs{bs}"
                extraction[key] = round(args.images / wall, 1)
                profile[key] = {
                    "gpu_busy_percent": busy.mean, "host_cores_busy": round((cpu_seconds() - cpu_before) / wall, 2),
                    "gpu_peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                    if args.device.startswith("cuda") else None,
                }
    best_forward, best_extract = max(forward.values()), max(extraction.values())
    report(
        "gpu", model=args.model, size=args.size, images=args.images, amp=str(amp).removeprefix("torch."), taps="all",
        num_workers=args.num_workers, writers=args.writers, images_from=args.images_from,
        data_s=round(generate_s, 1), forward_img_s=forward, extract_img_s=extraction, profile=profile,
        best_forward_img_s=best_forward,
        best_extract_img_s=best_extract, extract_vs_forward=round(best_extract / best_forward, 3), target=600,
    )


if __name__ == "__main__":
    main()
