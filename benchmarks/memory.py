"""Peak host memory of ``extract`` and ``train`` against the size of the split (target: equal within 10%).

For each ``--images`` count, a synthetic COCO train2017 of that many entries (over ``--distinct``
generated JPEGs, :func:`common.synthetic_split`) is extracted into a workspace of its own with
the CLI, and an inverse module is trained one epoch from that cache (no validation split).
Each measured command is a child process of this script, run without worker processes
(``extract --num-workers 0``; ``train`` reads in threads, ``--decode-threads 1``) so that its whole
work is in it; its peak resident set comes from
``os.wait4``, the kernel's own count for that child. Growth = the largest split's peak over the
smallest's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import report, synthetic_split  # noqa: E402


def peak_rss_mb(args: list[str]) -> float:
    """Run ``python -m invcache.cli ARGS`` and return its peak resident set in MB (Linux reports KiB)."""
    child = subprocess.Popen([sys.executable, "-m", "invcache.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "2"})
    _, status, usage = os.wait4(child.pid, 0)
    errors = child.stderr.read().decode(errors="replace")
    child.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"invcache {' '.join(args)} failed: {errors[-2000:]}")
    return usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", default="1000,10000", help="Comma-separated split sizes.")
    parser.add_argument("--distinct", type=int, default=64, help="Generated JPEGs the entries cycle over.")
    parser.add_argument("--size", default="64x96")
    parser.add_argument("--model", default="detr-tiny")
    parser.add_argument("--module", default="encoder-inv")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=256)
    args = parser.parse_args()
    counts = [int(n) for n in args.images.split(",")]
    height, width = (int(v) for v in args.size.split("x"))
    extract_mb, train_mb = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for count in counts:
            coco = Path(scratch) / f"coco-{count}"
            synthetic_split(coco, count, args.distinct, (height, height), (width, width), split="train2017")
            workspace = Path(scratch) / f"runs-{count}"
            common = ["--coco-root", str(coco), "--root", str(workspace), "--model", args.model, "--weights",
                      "random:0", "--size", args.size, "--num-workers", "0", "--batch-size", str(args.batch_size),
                      "--shard-size", str(args.shard_size)]
            extract_mb.append(peak_rss_mb(["extract", "--split", "train2017", *common]))
            train_mb.append(peak_rss_mb(["train", args.module, "--root", str(workspace), "--epochs", "1",
                                         "--batch-size", str(args.batch_size), "--decode-threads", "1"]))
    report("memory", model=args.model, size=args.size, images=counts, module=args.module,
           extract_peak_rss_mb=[round(v) for v in extract_mb], train_peak_rss_mb=[round(v) for v in train_mb],
           extract_growth=round(extract_mb[-1] / extract_mb[0], 3), train_growth=round(train_mb[-1] / train_mb[0], 3),
           target=1.10)


if __name__ == "__main__":
    main()
