"""The embedded default ``--weights demo``: detr-tiny trained on the synthetic shapes, from the public API only.

Trains detr-tiny from random weights on a synthetic split of 4096 images (validation: 256 others),
then writes the best epoch's weights as float16 safetensors under the official key names to
``invcache/models/embedded/detr-tiny-demo.safetensors`` (the package's size limit is 25 MB; the
float32 file is 45 MB) and prints its sha256, which goes into
:data:`invcache.models.weights.EMBEDDED_WEIGHTS` with this command. About 17 minutes on two CPU
cores. The recipe differs from the official one where random weights need it (docs/training.md,
"The embedded default"): the whole backbone trains, batch norms included, at the base rate, and
there is no dropout.

    python pipelines/demo_detr.py --root invcache-runs/demo-detr
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from safetensors.torch import load_file, save_file

import invcache

EMBEDDED = Path(__file__).resolve().parent.parent / "invcache" / "models" / "embedded" / "detr-tiny-demo.safetensors"


def recipe(root: str, num_workers: int = 1) -> invcache.DetrTrainSettings:
    return invcache.DetrTrainSettings(
        model="detr-tiny", weights="random:0", source="synthetic", workspace=root,
        split="shapes-train", synthetic_images=4096, val_split="shapes-val", synthetic_val_images=256,
        size=(128, 160), epochs=14, lr_drop=10, batch_size=32, lr=1e-4, lr_backbone=1e-4, full_backbone=True,
        dropout=0.0, device="cpu", num_workers=num_workers, resume=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="invcache-runs/demo-detr", help="Workspace for the data and the run.")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=EMBEDDED, help="Where the float16 weights go.")
    args = parser.parse_args()
    result = invcache.train_detr(recipe(args.root, args.num_workers))
    weights = load_file(str(result.out / "best.safetensors"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, str(args.out))
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"{args.out}: best validation AP {result.best_ap:.4f}; sha256 {digest}")


if __name__ == "__main__":
    main()
