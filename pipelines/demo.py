"""The demo (``make demo``): the main job on the embedded default, from the public API only.

Synthetic COCO-format train2017 (256 images) and val2017 (16) → frozen detr-tiny with the embedded
default weights (``demo``: trained on the synthetic shapes, pipelines/demo_detr.py) → caches of
every tap → the inverse modules trained from the caches alone → every analysis → one HTML
report. A rerun resumes (see ``main_job.py``).

    python pipelines/demo.py --root invcache-runs/demo
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from main_job import MainJob  # noqa: E402


def demo(root: str, *, train_images: int = 256, val_images: int = 16, epochs: int | None = None,
         num_workers: int = 2) -> MainJob:
    """The demo's job; the tests run the same recipe with fewer images and ``epochs``."""
    module_epochs = {"backbone-inv": 40, "encoder-inv": 10, "decoder-inv": 10, "head-inv": 10}  # B⁻¹ learns slowest
    return MainJob(
        root=root, model="detr-tiny", weights="demo", size=(128, 160), source="synthetic",
        split_images={"train2017": train_images, "val2017": val_images},
        epochs={name: epochs or e for name, e in module_epochs.items()}, batch_size=32, width="small",
        shard_size=32, num_workers=num_workers, analysis_batch_size=32,
        # synthetic objects cover at most ~20% of an image; COCO's selected ones 30% or more
        color_options={"min_area": 0.05},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="invcache-runs/demo", help="Workspace for caches, modules and results.")
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()
    demo(args.root, num_workers=args.num_workers).run()


if __name__ == "__main__":
    main()
