"""The ``invcache`` command: a thin click layer over the Python API."""

from __future__ import annotations

import os
import sys
import time
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
@click.option("--device", default=None, help="[default: cuda if available, else cpu]")
@click.option("--amp", type=click.Choice(["bf16", "fp16", "off"]), default=None,
              help="Autocast dtype [default: bf16 on CUDA, off elsewhere].")
def taps(model_name, weights, source, wds_pattern, coco_root, root, split, size, num_images, layers, device, amp):
    """Run DETR on a few images and show each requested tap's shape and statistics."""
    from invcache.data import WdsImages, open_split
    from invcache.distributed import resolve_device
    from invcache.forward import forward_taps, resolve_amp
    from invcache.models import build_detr, get_config

    selected = get_config(model_name).select_taps(layers)
    if wds_pattern:
        dataset = WdsImages(wds_pattern, size)
        samples = [s for _, s in zip(range(num_images), dataset)]
    else:
        dataset = open_split(source, split, coco_root=coco_root, workspace=root, size=size)
        samples = [dataset[i] for i in range(min(num_images, len(dataset)))]
    device = resolve_device(device)
    model = build_detr(model_name, weights, device=device)
    batch = torch.stack([s["input"] for s in samples])
    out = forward_taps(model, batch, selected, resolve_amp(amp, device))

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


def _progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=Console(stderr=True),
        transient=False,
    )


@cli.command()
@click.option("--split", required=True, help="COCO split, e.g. train2017 or val2017.")
@click.option("--layers", default="all", show_default=True, help="Taps: comma list and globs, or all.")
@click.option("--source", type=click.Choice(["coco", "synthetic"]), default="coco", show_default=True)
@click.option("--wds", "wds_pattern", default=None, help="Read the split from webdataset shards (URL pattern).")
@click.option("--coco-root", type=click.Path(path_type=Path), envvar="COCO_ROOT", default="./data/coco",
              show_default=True)
@click.option("--root", type=click.Path(path_type=Path), envvar="INVCACHE_ROOT", default="./invcache-runs",
              show_default=True, help="Workspace; the cache goes to <root>/cache/<split> unless --out.")
@click.option("--out", type=str, default=None, help="Cache location (path or URL zarr opens).")
@click.option("--model", "model_name", default="detr-r50", show_default=True)
@click.option("--weights", default="official", show_default=True)
@click.option("--size", default="480x640", show_default=True, callback=_size)
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--num-workers", type=click.IntRange(0), default=min(8, os.cpu_count() or 1), show_default=True)
@click.option("--device", default=None, help="[default: cuda if available, else cpu]")
@click.option("--amp", type=click.Choice(["bf16", "fp16", "off"]), default=None,
              help="Autocast dtype [default: bf16 on CUDA, off elsewhere].")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N images (ascending id).")
@click.option("--shard-size", type=click.IntRange(1), default=256, show_default=True, help="Images per shard.")
@click.option("--keepbits", type=click.IntRange(1, 10), default=None,
              help="Lossy: keep N of float16's 10 mantissa bits (BitRound).")
@click.option("--writers", type=click.IntRange(1), default=max(2, min(8, (os.cpu_count() or 1) // 4)),
              show_default=True, help="Shard writer threads (and as many compression threads).")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache made with other settings.")
@click.option("--strict", is_flag=True, help="Exit non-zero if any image failed.")
@click.option("--force", is_flag=True, help="Start even if the disk estimate exceeds the free space.")
@click.option("--synthetic-images", type=click.IntRange(1), default=None,
              help="Size of a generated synthetic split [default: 64 train2017, 16 val2017].")
def extract(split, layers, source, wds_pattern, coco_root, root, out, model_name, weights, size, batch_size,
            num_workers, device, amp, limit, shard_size, keepbits, writers, overwrite, strict, force, synthetic_images):
    """Stream a split through frozen DETR into a sharded fp16 zarr cache (resumable)."""
    from invcache.extract import ExtractSettings
    from invcache.extract import extract as run_extract

    settings = ExtractSettings(
        split=split, layers=layers, source=source, wds=wds_pattern, coco_root=coco_root, workspace=root, out=out,
        model=model_name, weights=weights, size=size, batch_size=batch_size, num_workers=num_workers,
        device=device, amp=amp, limit=limit, shard_size=shard_size, keepbits=keepbits, overwrite=overwrite,
        strict=strict, force=force, writers=writers, synthetic_images=synthetic_images,
    )
    show = int(os.environ.get("RANK", "0")) == 0
    bar = _progress_bar()
    state = {"task": None, "started": 0.0, "done": 0, "written": 0}

    def plan(total: int) -> None:
        # The bar starts once the settings are checked, so a rejected run prints only its error.
        if show:
            bar.start()
        state.update(task=bar.add_task(f"extract {split}", total=total, rate=""), started=time.perf_counter())

    def advance(images: int, raw_bytes: int) -> None:
        state["done"] += images
        state["written"] += raw_bytes
        elapsed = max(time.perf_counter() - state["started"], 1e-9)
        bar.update(state["task"], advance=images,
                   rate=f"{state['done'] / elapsed:.1f} img/s  {state['written'] / elapsed / 1e6:.1f} MB/s")

    try:
        result = run_extract(settings, progress=advance, on_plan=plan)
    finally:
        bar.stop()
    if show:
        console.print(
            f"{result.cache}: {result.images} images, {result.shards_written} shard(s) written, "
            f"{result.shards_skipped} already complete, {len(result.failures)} failure(s), "
            f"{result.seconds:.1f} s"
        )
        for failure in result.failures[:20]:
            console.print(f"[yellow]  image {failure['image_id']}: {failure['reason']}[/yellow]")
        if len(result.failures) > 20:
            console.print(f"[yellow]  … and {len(result.failures) - 20} more (see invcache info)[/yellow]")
    if strict and result.failures:
        raise InvcacheError(f"{len(result.failures)} image(s) failed and --strict is set")


@cli.command()
@click.argument("cache_path")
def info(cache_path):
    """Show a cache's taps, shapes, codec, sizes, shard progress, failures and provenance."""
    from invcache.cache.inspect import cache_info

    summary = cache_info(cache_path)
    table = Table(title=f"{cache_path}")
    for column in ("array", "shape", "dtype", "stored", "raw", "ratio"):
        table.add_column(column, justify="left" if column == "array" else "right")
    for row in summary["arrays"]:
        table.add_row(row["name"], str(tuple(row["shape"])), row["dtype"], _mb(row["stored_bytes"]),
                      _mb(row["raw_bytes"]), f"{row['ratio']:.2f}x")
    console.print(table)
    console.print(f"shards complete: {summary['complete_shards']}/{summary['num_shards']}  "
                  f"images: {summary['num_images']}  per image stored: {_mb(summary['stored_bytes_per_image'])}")
    codec = summary["codec"]
    console.print(f"codec: blosc {codec['cname']} level {codec['clevel']} {codec['shuffle']}, "
                  f"checksum {codec['checksum']}, keepbits {codec['keepbits']}")
    if summary.get("keepbits_error"):
        err = summary["keepbits_error"]
        console.print(f"lossy error (keepbits {codec['keepbits']}): relative error at most {err['max_relative']:.2e}, "
                      f"expected mean {err['expected_mean_relative']:.2e}")
    model = summary["attrs"].get("model", {})
    source = summary["attrs"].get("source", {})
    console.print(f"model: {model.get('model')} weights {model.get('weights')} "
                  f"sha256 {str(model.get('weights_sha256'))[:16]}")
    console.print(f"source: {source.get('kind')} {source.get('split')} annotations sha256 "
                  f"{str(source.get('annotation_sha256'))[:16]}")
    console.print(f"preprocessing: {summary['attrs'].get('preprocessing')}")
    console.print(f"created: {summary['attrs'].get('created')}  versions: {summary['attrs'].get('versions')}")
    console.print(f"failures: {len(summary['failures'])}")
    for failure in summary["failures"]:
        console.print(f"  image {failure['image_id']}: {failure['reason']}")


@cli.command()
@click.argument("cache_path")
def verify(cache_path):
    """Read every chunk; name each array and shard that fails its checksum (exit 1 if any)."""
    from invcache.cache.inspect import verify_cache

    problems = verify_cache(cache_path)
    for problem in problems:
        print(f"corrupt: {problem}", file=sys.stderr)
    if problems:
        raise InvcacheError(f"{len(problems)} corrupt shard(s) in {cache_path}")
    console.print(f"{cache_path}: every chunk verifies")


@cli.command("train")
@click.argument("name", type=click.Choice(["backbone-inv", "encoder-inv", "decoder-inv", "head-inv"]))
@click.option("--cache", default=None, help="Training cache [default: <root>/cache/train2017].")
@click.option("--val-cache", default=None, help="Validation cache [default: <root>/cache/val2017 if present].")
@click.option("--root", type=click.Path(path_type=Path), envvar="INVCACHE_ROOT", default="./invcache-runs",
              show_default=True)
@click.option("--from", "source", default=None, help="Train from another tap (a per-layer inverse), e.g. enc.3.")
@click.option("--epochs", type=click.IntRange(1), default=100, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True)
@click.option("--lr", type=float, default=None, help="[default: the module's: B⁻¹ 3e-3, E⁻¹ 1e-3, D⁻¹ 1e-4, P⁻¹ 1e-3]")
@click.option("--amp", type=click.Choice(["bf16", "fp16", "off"]), default=None,
              help="Autocast dtype [default: bf16 on CUDA, off elsewhere].")
@click.option("--out", default=None, help="Checkpoint folder [default: <root>/modules/NAME].")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--num-workers", type=click.IntRange(0), default=2, show_default=True)
@click.option("--width", type=click.Choice(["full", "small"]), default="full", show_default=True,
              help="B⁻¹ width: the authors' (~79M parameters) or 1/8 of it for CPUs.")
@click.option("--class-input", type=click.Choice(["onehot", "scores"]), default="onehot", show_default=True,
              help="P⁻¹ class input: one-hot argmax (the paper's) or softmax scores.")
@click.option("--device", default=None, help="[default: cuda if available, else cpu]")
def train_command(name, cache, val_cache, root, source, epochs, batch_size, lr, amp, out, resume, seed, num_workers,
                  width, class_input, device):
    """Train an inverse module from the cache alone (DETR is never run)."""
    from invcache.train import TrainSettings, train

    settings = TrainSettings(
        name=name, cache=cache, val_cache=val_cache, workspace=root, from_tap=source, epochs=epochs,
        batch_size=batch_size, lr=lr, amp=amp, out=out, resume=resume, seed=seed, num_workers=num_workers,
        width=width, class_input=class_input, device=device,
    )
    show = int(os.environ.get("RANK", "0")) == 0
    bar = _progress_bar()
    state = {"task": None, "epoch": 0}

    def report(stage: str, done: int, total: int, loss: float) -> None:
        if stage == "val":
            state["epoch"] += 1
            if show:
                bar.console.print(f"epoch {state['epoch']}: validation loss {loss:.5f}")
            return
        if state["task"] is None:
            if show:
                bar.start()
            state["task"] = bar.add_task(f"train {name}", total=total, rate="")
        if done == 1:
            bar.reset(state["task"], total=total)
        bar.update(state["task"], completed=done, rate=f"loss {loss:.4f}")

    try:
        result = train(settings, progress=report)
    finally:
        bar.stop()
    if show:
        console.print(f"{name}: {result.steps} steps, best validation loss {result.best_val_loss:.5f}; "
                      f"checkpoints in {result.out}")


@cli.command("reconstruct")
@click.option("--stage", "stages", default="all", show_default=True,
              help="backbone, encoder, decoder, head (comma list) or all.")
@click.option("--cache", default=None, help="Cache to reconstruct from [default: <root>/cache/val2017].")
@click.option("--modules", default=None, help="Folder with backbone-inv/ … head-inv/ [default: <root>/modules].")
@click.option("--root", type=click.Path(path_type=Path), envvar="INVCACHE_ROOT", default="./invcache-runs",
              show_default=True)
@click.option("--ids", default=None, help="Comma list of COCO image ids.")
@click.option("--n", "count", type=click.IntRange(1), default=8, show_default=True,
              help="Otherwise the first N valid images.")
@click.option("--out", default=None, help="[default: <root>/analysis/reconstruct]")
@click.option("--device", default=None, help="[default: cuda if available, else cpu]")
def reconstruct_command(stages, cache, modules, root, ids, count, out, device):
    """Reconstruct images from each stage's cached embedding; PNG grid and per-image MSE."""
    from invcache.reconstruct import parse_stages, reconstruct

    try:
        id_list = [int(i) for i in ids.split(",")] if ids else None
    except ValueError:
        raise UsageError(f"bad --ids {ids!r}: expected a comma list of integers") from None
    out = Path(out) if out else root / "analysis" / "reconstruct"
    results = reconstruct(cache or str(root / "cache" / "val2017"), modules or root / "modules", out,
                          parse_stages(stages), id_list, count, device)
    table = Table(title=f"reconstruction MSE over {len(results['images'])} image(s)")
    for column in ("stage", "normalized", "pixel [0,1]"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for label in ["baseline", *results["stages"]]:
        table.add_row(label if label != "baseline" else "mean image (baseline)",
                      f"{results['mean'][f'{label}_mse_normalized']:.4f}",
                      f"{results['mean'][f'{label}_mse_pixel']:.5f}")
    console.print(table)
    console.print(f"grid: {out / 'grid.png'}  metrics: {out / 'metrics.json'}")


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def _one_line(error: Exception) -> str:
    """The message of an error; one raised in a DataLoader worker arrives wrapped in the worker's traceback."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text.splitlines()[0] if text else type(error).__name__


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
        print(f"invcache: error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except InvcacheError as exc:
        print(f"invcache: error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
