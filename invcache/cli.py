"""The ``invcache`` command: a thin click layer over the Python API."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.table import Table

from invcache.errors import InvcacheError, UsageError

console = Console(soft_wrap=True)


def _size(ctx, param, value):
    from invcache.data import parse_size

    return parse_size(value) if isinstance(value, str) else value


@click.group()
@click.version_option(package_name="invcache")
def cli() -> None:
    """Feature inversion of DETR from a cache of its intermediate tensors."""


@cli.command()
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="COCO root to write (<out>/<split>/, <out>/annotations/).")
@click.option("--split", default="val2017", show_default=True)
@click.option("--images", "num_images", type=click.IntRange(1), default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--fault", "faults", multiple=True,
              help="Write one image broken or in an odd mode (repeatable): truncated, zero_bytes, missing, "
                   "grayscale, cmyk, palette, rgba, gray16.")
def synthetic(out: Path, split: str, num_images: int, seed: int, faults: tuple[str, ...]) -> None:
    """Generate a deterministic COCO-format dataset of simple shapes."""
    from invcache.data import FAULTS, generate_coco

    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise UsageError(f"unknown --fault {unknown[0]!r}; choose from: {', '.join(FAULTS)}")
    path = generate_coco(out, split, num_images=num_images, seed=seed, faults=faults)
    console.print(f"wrote {num_images} images to {out / split} and annotations to {path}")


@cli.command("to-wds")
@click.option("--coco-root", type=click.Path(path_type=Path), envvar="COCO_ROOT", default="./data/coco",
              show_default=True)
@click.option("--split", required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--images-per-shard", type=click.IntRange(1), default=1000, show_default=True)
def to_wds(coco_root: Path, split: str, out: Path, images_per_shard: int) -> None:
    """Convert a COCO split to webdataset tar shards (.jpg + .json per image)."""
    from invcache.data import coco_to_wds

    shards = coco_to_wds(coco_root, split, out, images_per_shard)
    console.print(f"wrote {len(shards)} shard(s) to {out}")


@cli.command()
@click.option("--model", "model_name", default="detr-r50", show_default=True)
@click.option("--weights", default="official", show_default=True,
              help="official, random[:SEED], or an official/HF checkpoint path.")
@click.option("--source", type=click.Choice(["coco", "synthetic"]), default="coco", show_default=True)
@click.option("--wds", "wds_pattern", default=None, help="Read images from webdataset shards instead.")
@click.option("--coco-root", type=click.Path(path_type=Path), envvar="COCO_ROOT", default="./data/coco",
              show_default=True)
@click.option("--root", type=click.Path(path_type=Path), envvar="INVCACHE_ROOT", default="./invcache-runs",
              show_default=True)
@click.option("--split", default="val2017", show_default=True)
@click.option("--size", default="480x640", show_default=True, callback=_size, help="Resize to HxW.")
@click.option("--images", "num_images", type=click.IntRange(1), default=2, show_default=True)
@click.option("--layers", default="all", show_default=True, help="Taps: comma list and globs, or all.")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@click.option("--amp", type=click.Choice(["bf16", "fp16", "off"]), default=None,
              help="Autocast dtype [default: bf16 on CUDA, off elsewhere].")
def taps(model_name, weights, source, wds_pattern, coco_root, root, split, size, num_images, layers, device, amp):
    """Run DETR on a few images and show each requested tap's shape and statistics."""
    from invcache.data import WdsImages, open_split
    from invcache.forward import forward_taps, resolve_amp
    from invcache.models import build_detr, get_config

    selected = get_config(model_name).select_taps(layers)
    if wds_pattern:
        dataset = WdsImages(wds_pattern, size)
        samples = [s for _, s in zip(range(num_images), dataset)]
    else:
        dataset = open_split(source, split, coco_root=coco_root, workspace=root, size=size)
        samples = [dataset[i] for i in range(min(num_images, len(dataset)))]
    model = build_detr(model_name, weights, device=device)
    batch = torch.stack([s["input"] for s in samples])
    out = forward_taps(model, batch, selected, resolve_amp(amp, torch.device(device)))

    table = Table(title=f"{model_name} ({model.fingerprint['weights']}) on {len(samples)} {split} image(s) at "
                        f"{size[0]}x{size[1]}")
    for column in ("tap", "shape per image", "dtype", "mean", "std"):
        table.add_column(column, justify="left" if column == "tap" else "right")
    for tap, tensor in out.items():
        values = tensor.float()
        table.add_row(tap, str(tuple(tensor.shape[1:])), str(tensor.dtype).removeprefix("torch."),
                      f"{values.mean().item():.4g}", f"{values.std().item():.4g}")
    console.print(table)
    failed = [s for s in samples if not s["valid"]]
    for s in failed:
        console.print(f"[yellow]image {s['image_id']} unreadable: {s['error']}[/yellow]")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors are one line on stderr (exit 2 for usage, 1 otherwise), no traceback."""
    try:
        rc = cli.main(args=argv, prog_name="invcache", standalone_mode=False)
    except click.exceptions.Abort:
        print("invcache: aborted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as exc:
        print(f"invcache: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except UsageError as exc:
        print(f"invcache: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except InvcacheError as exc:
        print(f"invcache: error: {exc}", file=sys.stderr)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
