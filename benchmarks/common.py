"""Shared bits of the benchmark scripts: thread pinning, timing, the one-line JSON report."""

from __future__ import annotations

import json
import os
import platform
import time

import torch


def setup(threads: int = 2) -> None:
    torch.set_num_threads(threads)


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def best_of(repeats: int, fn) -> float:
    """Smallest wall time of ``repeats`` calls (seconds)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def report(name: str, **figures) -> None:
    print(json.dumps({"benchmark": name, **figures, "machine": machine()}), flush=True)


def synthetic_split(root, images: int, distinct: int, height_range, width_range, split: str = "val2017"):
    """A synthetic COCO ``split`` of ``images`` entries drawn over ``distinct`` generated JPEGs.

    Generating a JPEG costs more than extracting it, so long runs reuse files under new
    image ids; every entry is still decoded, resized, forwarded and written on its own.
    """
    import json

    from invcache.data import generate_coco

    path = generate_coco(root, split, num_images=min(images, distinct), height_range=height_range,
                         width_range=width_range)
    dataset = json.loads(path.read_text())
    originals = dataset["images"]
    next_id = max(record["id"] for record in originals) + 1
    for i in range(images - len(originals)):
        dataset["images"].append({**originals[i % len(originals)], "id": next_id + i})
    path.write_text(json.dumps(dataset))
    return root
