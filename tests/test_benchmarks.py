"""Every benchmark script runs at a tiny size and prints one JSON line with its ratio, so none can rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"

CASES = {
    "writer.py": ["--shards", "2", "--shard-size", "4", "--tokens", "20", "--taps", "2", "--repeats", "1"],
    "extract_overhead.py": ["--images", "8", "--distinct", "4", "--size", "64x96", "--batch-size", "4",
                            "--num-workers", "0", "--shard-size", "4"],
    "storage.py": ["--model", "detr-tiny", "--size", "64x96", "--images", "2"],
    "reader.py": ["--images", "64", "--shard-size", "16", "--tokens", "20", "--batch-size", "16",
                  "--num-workers", "0"],
    "train_speed.py": ["--model", "detr-tiny", "--size", "64x96", "--batch-size", "4", "--steps", "2",
                       "--num-workers", "0"],
    "analysis.py": ["--images", "16", "--batch-size", "8", "--size", "64x96"],
    "gpu.py": ["--device", "cpu", "--model", "detr-tiny", "--size", "64x96", "--images", "8", "--distinct", "4",
               "--batch-sizes", "4", "--num-workers", "0", "--writers", "1", "--shard-size", "4"],
    "detr_loss.py": ["--model", "detr-tiny", "--size", "64x96", "--batch-size", "2", "--steps", "2"],
    "detr_train.py": ["--model", "detr-tiny", "--size", "64x96", "--batch-size", "2", "--steps", "1", "--rounds", "1"],
    "memory.py": ["--images", "8,12", "--distinct", "4", "--batch-size", "4", "--shard-size", "4"],
    "codecs.py": ["--images", "4", "--size", "64x96"],
    "image_codecs.py": ["--size", "64x96", "--repeats", "1"],
    "host_cost.py": ["--model", "detr-tiny", "--size", "64x96", "--images", "16", "--batch-size", "4",
                     "--shard-size", "8"],
    "decode_paths.py": ["--size", "64x96", "--repeats", "1"],
}
RATIO_KEYS = {"writer.py": "ratio", "extract_overhead.py": "ratio", "storage.py": "mb_per_image",
              "reader.py": "ratio", "train_speed.py": "ratio", "gpu.py": "extract_vs_forward", "analysis.py": "ratio",
              "detr_loss.py": "matcher_share", "detr_train.py": "ratio", "memory.py": "extract_growth",
              "codecs.py": "ratio", "image_codecs.py": "ratio", "host_cost.py": "cpu_ms_per_image",
              "decode_paths.py": "ratio"}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(CASES))
def test_benchmark_prints_one_json_line(script):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *CASES[script]], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    figures = json.loads(lines[0])
    assert figures["benchmark"] == script.removesuffix(".py")
    assert figures[RATIO_KEYS[script]] > 0 and "machine" in figures
