"""Stored bytes per image for ``--layers all`` at 480×640, lossless and with ``--keepbits`` (targets: activations
≤ 1.2 MB, everything with ``input`` ≤ 1.8 MB on photographs).

The model is detr-r50 with random weights (no checkpoint can be downloaded here); its
LayerNorm'd taps have the statistics of trained ones. The images are the photographs bundled
with scikit-image and matplotlib, saved as JPEGs as COCO's are (``--images-from photographs``,
the default), or the synthetic shapes, which compress far better.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import photograph_split, report, setup  # noqa: E402

from invcache.cache.store import Cache  # noqa: E402
from invcache.data import generate_coco, parse_size  # noqa: E402
from invcache.extraction import ExtractSettings, extract  # noqa: E402


def per_image(location: Path) -> dict[str, float]:
    cache = Cache.open(location)
    return {tap: cache.array(tap).nbytes_stored() / cache.num_images for tap in cache.taps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="detr-r50")
    parser.add_argument("--size", default="480x640")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--keepbits", type=int, default=7)
    parser.add_argument("--images-from", choices=("photographs", "synthetic"), default="photographs")
    args = parser.parse_args()
    setup()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.images_from == "photographs":
            photograph_split(root / "coco", args.images)
        else:
            generate_coco(root / "coco", "val2017", num_images=args.images, height_range=(427, 640),
                          width_range=(480, 640))
        common = dict(split="val2017", coco_root=root / "coco", model=args.model, weights="random:0", size=size,
                      batch_size=4, num_workers=1, shard_size=args.images)
        extract(ExtractSettings(out=root / "lossless", **common))
        extract(ExtractSettings(out=root / "lossy", keepbits=args.keepbits, **common))
        lossless, lossy = per_image(root / "lossless"), per_image(root / "lossy")
        exact, rounded = Cache.open(root / "lossless"), Cache.open(root / "lossy")
        errors = []
        for tap in exact.taps:
            if tap == "input":
                continue
            a, b = exact.array(tap)[:].astype(np.float32), rounded.array(tap)[:].astype(np.float32)
            errors.append(np.abs(a - b).sum() / np.abs(a).sum())
    activations = sum(v for t, v in lossless.items() if t != "input")
    total = sum(lossless.values()) / 1e6
    report(
        "storage", model=args.model, size=args.size, images=args.images, images_from=args.images_from,
        mb_per_image=round(total, 3),
        activations_mb_per_image=round(activations / 1e6, 3),
        input_mb_per_image=round(lossless["input"] / 1e6, 3),
        keepbits=args.keepbits, keepbits_mb_per_image=round(sum(lossy.values()) / 1e6, 3),
        keepbits_relative_l1_error=float(f"{max(errors):.3g}"),
        per_tap_kb={t: round(v / 1e3, 1) for t, v in lossless.items()},
        activations_target_mb=1.2, meets_activations_target=activations / 1e6 <= 1.2,
        target_mb=1.8, meets_target=total <= 1.8,
    )


if __name__ == "__main__":
    main()
