"""The paper on COCO 2017 with the official DETR-R50 on one GPU (the authors' settings), from the public API only.

480×640 images (aspect ignored), every tap of train2017 and val2017 cached once, B⁻¹ (full
width, ~79M parameters), E⁻¹, D⁻¹ and P⁻¹ trained 100 epochs each at batch size 128 from the
cache, then every analysis and the report. Needs COCO at ``--coco-root`` (official layout) and
the published checkpoint (``--weights official`` fetches it through torch.hub's cache).
A rerun resumes where it stopped.

    python pipelines/paper.py --coco-root data/coco --root invcache-runs/paper
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from main_job import MainJob  # noqa: E402

PAPER_EPOCHS = {"backbone-inv": 100, "encoder-inv": 100, "decoder-inv": 100, "head-inv": 100}


def paper(root: str, coco_root: str, *, weights: str = "official", limit: int | None = None,
          epochs: int | None = None, size: tuple[int, int] = (480, 640), num_workers: int = 8,
          color_options: dict | None = None) -> MainJob:
    """The paper's job; ``limit`` (first N images of each split), ``epochs``, ``size`` and ``color_options``
    (``categories``, ``min_area`` of ``analyze color``; default the paper's) shrink it for a smoke run."""
    return MainJob(
        root=root, model="detr-r50", weights=weights, size=size, source="coco", coco_root=coco_root,
        split_images={"train2017": limit, "val2017": limit},
        epochs={name: epochs or e for name, e in PAPER_EPOCHS.items()}, batch_size=128, width="full",
        shard_size=256, num_workers=num_workers, analysis_batch_size=64, color_options=color_options or {},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco-root", default="data/coco")
    parser.add_argument("--root", default="invcache-runs/paper")
    parser.add_argument("--weights", default="official")
    parser.add_argument("--num-workers", type=int, default=8)
    args = parser.parse_args()
    paper(args.root, args.coco_root, weights=args.weights, num_workers=args.num_workers).run()


if __name__ == "__main__":
    main()
