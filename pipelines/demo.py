"""The demo recipe (``make demo``): the main job end to end on the embedded default, from the public API only.

Synthetic COCO-format train2017 (256 images) and val2017 (16) → frozen detr-tiny → caches of
every tap → the four inverse modules trained from the caches alone → reconstructions of
validation images from every stage, with per-image MSE beside the mean-image baseline.

Idempotent: extraction resumes (complete shards are skipped) and training resumes from each
module's ``last`` checkpoint, so a rerun after an interruption finishes the job and a rerun
after success only redraws the reconstructions.

    python pipelines/demo.py --root invcache-runs/demo
"""

from __future__ import annotations

import argparse
import time

import invcache
from invcache.analysis import stages

MODEL = {"model": "detr-tiny", "weights": "random:0", "size": (128, 160), "shard_size": 32}
# (module, epochs, extra settings): B⁻¹ learns slowest, so it gets the most epochs.
MODULES = [
    ("backbone-inv", 40, {"width": "small"}),
    ("encoder-inv", 10, {}),
    ("decoder-inv", 10, {}),
    ("head-inv", 10, {}),
]


def run(root: str, *, train_images: int = 256, val_images: int = 16, epochs: int | None = None, count: int = 8,
        num_workers: int = 2) -> dict:
    """Run (or finish) the demo under ``root``; returns the reconstruction results.

    The defaults are the demo's; the tests run the same recipe with fewer images and ``epochs``.
    """
    workspace = invcache.Workspace.at(root)
    for split, images in {"train2017": train_images, "val2017": val_images}.items():
        started = time.perf_counter()
        result = invcache.extract(invcache.ExtractSettings(
            split=split, source="synthetic", workspace=root, synthetic_images=images, num_workers=num_workers,
            **MODEL))
        print(f"extract {split}: {result.shards_written} shard(s) written, {result.shards_skipped} already complete "
              f"({time.perf_counter() - started:.1f} s) -> {result.cache}")
    for name, module_epochs, extra in MODULES:
        started = time.perf_counter()
        result = invcache.train(invcache.TrainSettings(
            name, workspace=root, epochs=epochs or module_epochs, batch_size=32, resume=True, num_workers=num_workers,
            **extra))
        print(f"train {name}: {result.epochs} epochs, best validation loss {result.best_val_loss:.4f} "
              f"({time.perf_counter() - started:.1f} s) -> {result.out}")
    results = stages.run(invcache.AnalyzeSettings(workspace=root, n=count))
    for label, errors in results["mse"].items():
        pixel, normalized = errors["pixel"], errors["normalized"]
        print(f"  {label:>9}: MSE {pixel['mean']:.4f} ± {pixel['ci95']:.4f} in [0,1] pixels, "
              f"{normalized['mean']:.3f} normalized")
    print(f"reconstructions: {workspace.analysis(stages.NAME) / 'grid.png'}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="invcache-runs/demo", help="Workspace for caches, modules and results.")
    parser.add_argument("--n", type=int, default=8, help="Validation images in the reconstruction grid.")
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()
    run(args.root, count=args.n, num_workers=args.num_workers)


if __name__ == "__main__":
    main()
