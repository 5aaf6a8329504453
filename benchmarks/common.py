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
