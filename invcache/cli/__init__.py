"""The ``invcache`` command: a thin click layer over the Python API.

Nothing heavy is imported at module level (torch, zarr, the data readers load inside the
commands), so ``invcache --help`` answers at once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console

from invcache.cli.options import (
    amp_option,
    analysis_options,
    coco_root_option,
    device_option,
    dist_timeout_option,
    model_option,
    root_option,
    size_option,
    source_option,
    synthetic_images_option,
    wds_option,
    weights_option,
)
from invcache.errors import InvcacheError, UsageError
from invcache.settings import (
    COLOR_CATEGORIES,
    COLOR_MIN_AREA,
    DECODE_CHOICES,
    MAX_DECODE_THREADS,
    TRADEOFF_EPOCHS,
    TRADEOFF_LAMBDAS,
    TRADEOFF_LR,
    AnalyzeSettings,
    DetrTrainSettings,
    ExtractSettings,
    TrainSettings,
    default,
)
from invcache.workspace import DEFAULT_ROOT, ROOT_ENV, VAL_SPLIT

console = Console(soft_wrap=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="invcache")
def cli() -> None:
    """Feature inversion of DETR from a cache of its intermediate tensors."""


@cli.command()
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="COCO root to write (<out>/<split>/, <out>/annotations/).")
@click.option("--split", default=VAL_SPLIT, show_default=True)
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
@coco_root_option
@click.option("--split", required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--images-per-shard", type=click.IntRange(1), default=1000, show_default=True)
def to_wds(coco_root: Path, split: str, out: Path, images_per_shard: int) -> None:
    """Convert a COCO split to webdataset tar shards (.jpg + .json per image); print the --wds pattern."""
    from invcache.data import coco_to_wds, shard_pattern

    shards = coco_to_wds(coco_root, split, out, images_per_shard)
    print(f"wrote {len(shards)} shard(s); read them with --wds:", file=sys.stderr)
    # stdout holds only the pattern, so that `--wds "$(invcache to-wds …)"` works
    print(shard_pattern(shards))


@cli.command()
@model_option
@weights_option
@source_option
@synthetic_images_option
@wds_option
@coco_root_option
@root_option
@click.option("--split", default=VAL_SPLIT, show_default=True)
@size_option
@click.option("--images", "num_images", type=click.IntRange(1), default=2, show_default=True)
@click.option("--layers", default=default(ExtractSettings, "layers"), show_default=True,
              help="Taps: comma list and globs, or all.")
@device_option
@amp_option
def taps(model_name: str, weights: str, source: str, synthetic_images: int | None, wds_pattern: str | None,
         coco_root: Path, root: Path, split: str, size: tuple[int, int], num_images: int, layers: str,
         device: str | None, amp: str | None) -> None:
    """Run DETR on a few images and show each requested tap's shape and statistics."""
    import torch
    from rich.table import Table

    from invcache.data import WdsImages, open_split
    from invcache.distributed import resolve_device
    from invcache.forward import forward_taps, resolve_amp
    from invcache.models import build_detr, get_config

    selected = get_config(model_name).select_taps(layers)
    if wds_pattern:
        samples = [s for _, s in zip(range(num_images), WdsImages(wds_pattern, size))]
    else:
        dataset = open_split(source, split, coco_root=coco_root, workspace=root, size=size,
                             synthetic_images=synthetic_images)
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
    for s in samples:
        if not s["valid"]:
            console.print(f"[yellow]image {s['image_id']} unreadable: {s['error']}[/yellow]")


@cli.command()
@click.option("--split", required=True, help="COCO split, e.g. train2017 or val2017.")
@click.option("--layers", default=default(ExtractSettings, "layers"), show_default=True,
              help="Taps: comma list and globs, or all.")
@source_option
@synthetic_images_option
@wds_option
@coco_root_option
@root_option
@click.option("--out", type=str, default=default(ExtractSettings, "out"),
              help="Cache location (path or URL zarr opens) [default: <root>/cache/<split>; with --transform, "
                   "<root>/cache/<split>+<transform>, beside it].")
@model_option
@weights_option
@size_option
@click.option("--batch-size", type=click.IntRange(1), default=default(ExtractSettings, "batch_size"),
              show_default=True)
@click.option("--num-workers", type=click.IntRange(0), default=default(ExtractSettings, "num_workers"),
              show_default=True, help="DataLoader processes decoding and resizing images (on the device path: "
                                      "threads reading the files).")
@click.option("--decode", type=click.Choice(DECODE_CHOICES), default=default(ExtractSettings, "decode"),
              show_default=True, help="Where JPEGs are decoded and resized: cpu (PIL in DataLoader workers), device "
                                      "(in batches on the model's device, nvjpeg on CUDA; other files and JPEGs it "
                                      "rejects go to the CPU path), auto (device on CUDA unless --transform is given).")
@device_option
@amp_option
@click.option("--cudnn-benchmark", is_flag=True, default=default(ExtractSettings, "cudnn_benchmark"),
              help="Let cuDNN autotune its kernels: faster on GPU, but a resumed run may then differ from an "
                   "uninterrupted one in the last bits.")
@click.option("--limit", type=click.IntRange(1), default=default(ExtractSettings, "limit"),
              help="Only the first N images (ascending id; after --ids).")
@click.option("--transform", "transforms", multiple=True, metavar="NAME",
              help="Perturb each image after decoding, before resizing (repeatable, applied in order): grayscale, "
                   "or hue:<red|green|blue|+120|+240|identity>@<category> (the category's instance masks recoloured "
                   "through HSV; identity is the round trip alone; needs a COCO folder's annotations).")
@click.option("--ids", "ids_text", default=None, metavar="ID,ID,...",
              help="Only these image ids of the split (comma list).")
@click.option("--ids-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Only the image ids listed in FILE (one per line, # comments).")
@click.option("--shard-size", type=click.IntRange(1), default=default(ExtractSettings, "shard_size"),
              show_default=True, help="Images per shard.")
@click.option("--keepbits", type=click.IntRange(1, 10), default=default(ExtractSettings, "keepbits"),
              help="Lossy: keep N of float16's 10 mantissa bits (BitRound).")
@click.option("--writers", type=click.IntRange(1), default=default(ExtractSettings, "writers"), show_default=True,
              help="Shard writer threads (and as many compression threads).")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache made with other settings.")
@click.option("--strict", is_flag=True, help="Exit non-zero if any image failed.")
@click.option("--force", is_flag=True, help="Start even if the disk estimate exceeds the free space.")
@dist_timeout_option
def extract(split: str, layers: str, source: str, synthetic_images: int | None, wds_pattern: str | None,
            coco_root: Path, root: Path, out: str | None, model_name: str, weights: str, size: tuple[int, int],
            batch_size: int, num_workers: int, decode: str, device: str | None, amp: str | None,
            cudnn_benchmark: bool, limit: int | None, transforms: tuple[str, ...], ids_text: str | None,
            ids_file: Path | None, shard_size: int, keepbits: int | None, writers: int, overwrite: bool, strict: bool,
            force: bool, dist_timeout: float) -> None:
    """Stream a split through frozen DETR into a sharded fp16 zarr cache (resumable; torchrun shares it out)."""
    from invcache.cli.display import ExtractBar
    from invcache.distributed import process_group
    from invcache.extraction import extract as run_extract

    settings = ExtractSettings(
        split=split, layers=layers, source=source, wds=wds_pattern, coco_root=coco_root, workspace=root, out=out,
        model=model_name, weights=weights, size=size, batch_size=batch_size, num_workers=num_workers,
        device=device, amp=amp, limit=limit, transforms=transforms, ids=_extract_ids(ids_text, ids_file),
        shard_size=shard_size, keepbits=keepbits, overwrite=overwrite, strict=strict, force=force, writers=writers,
        synthetic_images=synthetic_images, cudnn_benchmark=cudnn_benchmark, decode=decode,
    )
    with process_group(dist_timeout) as (rank, _world), ExtractBar(f"extract {split}") as bar:
        callbacks = {"progress": bar.advance, "on_plan": bar.plan} if rank == 0 else {}
        result = run_extract(settings, **callbacks)
    if rank == 0:
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


def _extract_ids(text: str | None, ids_file: Path | None) -> tuple[int, ...] | None:
    """The ids of ``--ids`` (a comma list) or ``--ids-file``; None for the whole split."""
    from invcache.data.selection import read_ids_file

    if text is not None and ids_file is not None:
        raise UsageError("--ids and --ids-file both restrict the split: give one of them")
    if ids_file is not None:
        return tuple(read_ids_file(ids_file))
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part.isascii() and part.isdigit() for part in parts):
        raise UsageError(f"bad --ids {text!r}: expected a comma list of image ids, e.g. 139,285")
    return tuple(int(part) for part in parts)


def _cache_path(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A cache argument that names nothing is a wrong command-line value (exit 2), not a failed read."""
    from invcache.cache.store import Cache

    try:
        found = Cache.probe(value)
    except NotADirectoryError:
        raise click.BadParameter(f"{value} is a file, not a cache", ctx, param) from None
    if found == "absent":
        raise click.BadParameter(f"no cache at {value}", ctx, param)
    return value


@cli.command()
@click.argument("cache_path", callback=_cache_path)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (machine-readable).")
def info(cache_path: str, as_json: bool) -> None:
    """Show a cache's taps, shapes, codec, sizes, shard progress, failures and provenance."""
    from rich.table import Table

    from invcache.cache.inspect import cache_info

    summary = cache_info(cache_path)
    if as_json:
        # numpy scalars and arrays in the attributes serialize through .tolist(); anything else as its text
        print(json.dumps(summary, indent=2, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))
        return
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
                  f"checksum {codec['checksum']}, keepbits {codec['keepbits']}, uncompressed taps "
                  f"{', '.join(codec.get('uncompressed', [])) or 'none'}, input "
                  f"{_input_codec_text(codec.get('input'))}")
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
@click.argument("cache_path", callback=_cache_path)
def verify(cache_path: str) -> None:
    """Read every chunk; name each array and shard that fails its checksum (exit 1 if any)."""
    from invcache.cache.inspect import verify_cache

    problems = verify_cache(cache_path)
    for problem in problems:
        print(f"corrupt: {problem}", file=sys.stderr)
    if problems:
        raise InvcacheError(f"{len(problems)} problem(s) in {cache_path}")
    console.print(f"{cache_path}: every chunk verifies")


class _TrainCommand(click.Command):
    """``train NAME``; ``train detr …`` hands the rest of its command line to :func:`train_detr_command`.

    Training DETR takes other options than training an inverse module, so it is a command of its
    own; dispatching on the first argument keeps ``invcache train NAME [OPTIONS]`` as it was.
    """

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra) -> click.Context:
        if args[:1] == ["detr"]:
            return train_detr_command.make_context(f"{info_name} detr", args[1:], parent=parent, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)


@cli.command("train", cls=_TrainCommand)
@click.argument("name", type=click.Choice(["backbone-inv", "encoder-inv", "decoder-inv", "head-inv", "detr"]))
@click.option("--cache", default=default(TrainSettings, "cache"),
              help="Training cache [default: <root>/cache/train2017].")
@click.option("--val-cache", default=default(TrainSettings, "val_cache"),
              help="Validation cache [default: <root>/cache/val2017 if present].")
@root_option
@click.option("--from", "from_tap", default=default(TrainSettings, "from_tap"),
              help="Train from another tap (a per-layer inverse), e.g. enc.3.")
@click.option("--epochs", type=click.IntRange(1), default=default(TrainSettings, "epochs"), show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=default(TrainSettings, "batch_size"),
              show_default=True)
@click.option("--lr", type=float, default=default(TrainSettings, "lr"),
              help="[default: the module's: B⁻¹ 3e-3, E⁻¹ 1e-3, D⁻¹ 1e-4, P⁻¹ 1e-3]")
@amp_option
@click.option("--out", default=default(TrainSettings, "out"), help="Checkpoint folder [default: <root>/modules/NAME].")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--seed", type=int, default=default(TrainSettings, "seed"), show_default=True)
@click.option("--decode-threads", type=click.IntRange(1), default=default(TrainSettings, "decode_threads"),
              show_default=f"the cores, at most {MAX_DECODE_THREADS}",
              help="Threads that read and decode the cache's shards into batches.")
@click.option("--num-workers", type=click.IntRange(0), default=default(TrainSettings, "num_workers"), hidden=True,
              help="Deprecated and ignored (batches are read in --decode-threads threads).")
@click.option("--width", type=click.Choice(["full", "small"]), default=default(TrainSettings, "width"),
              show_default=True, help="B⁻¹ width: the authors' (~79M parameters) or 1/8 of it for CPUs.")
@click.option("--class-input", type=click.Choice(["onehot", "scores"]), default=default(TrainSettings, "class_input"),
              show_default=True, help="P⁻¹ class input: one-hot argmax (the paper's) or softmax scores.")
@device_option
@dist_timeout_option
def train_command(name: str, cache: str | None, val_cache: str | None, root: Path, from_tap: str | None, epochs: int,
                  batch_size: int, lr: float | None, amp: str | None, out: str | None, resume: bool, seed: int,
                  decode_threads: int, num_workers: int | None, width: str, class_input: str, device: str | None,
                  dist_timeout: float) -> None:
    """Train an inverse module from the cache alone (DETR is never run; torchrun trains data-parallel).

    `invcache train detr [OPTIONS]` trains DETR itself instead (see `invcache train detr --help`)."""
    from invcache.cli.display import TrainDisplay
    from invcache.distributed import process_group
    from invcache.training import train

    if name == "detr":  # only reached when options came before it: `train detr` is dispatched by _TrainCommand
        raise UsageError("write the options of `invcache train detr` after detr: invcache train detr [OPTIONS]")
    if num_workers is not None:
        print("invcache: warning: --num-workers is deprecated and ignored: batches are read in --decode-threads "
              "threads, without worker processes", file=sys.stderr)
    settings = TrainSettings(
        name=name, cache=cache, val_cache=val_cache, workspace=root, from_tap=from_tap, epochs=epochs,
        batch_size=batch_size, lr=lr, amp=amp, out=out, resume=resume, seed=seed, decode_threads=decode_threads,
        width=width, class_input=class_input, device=device,
    )
    with process_group(dist_timeout) as (rank, _world), TrainDisplay() as display:
        result = train(settings, progress=display if rank == 0 else None)
    if rank == 0:
        console.print(f"{name}: {result.steps} steps, best validation loss {result.best_val_loss:.5f}; "
                      f"checkpoints in {result.out}")


@click.command("detr", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_name", default=default(DetrTrainSettings, "model"), show_default=True)
@click.option("--weights", default=default(DetrTrainSettings, "weights"), show_default=True,
              help="Where training starts: random[:SEED], official, demo, or an official/HF checkpoint path "
                   "(a run's best.safetensors or last.pth too).")
@source_option
@click.option("--split", default=default(DetrTrainSettings, "split"), show_default=True, help="Training split.")
@click.option("--val-split", default=default(DetrTrainSettings, "val_split"), show_default=True,
              help="Validation split: box AP after every epoch; best.safetensors keeps the highest AP.")
@synthetic_images_option
@click.option("--synthetic-val-images", type=click.IntRange(1), default=default(DetrTrainSettings,
              "synthetic_val_images"), help="The same for the validation split.")
@coco_root_option
@root_option
@size_option
@click.option("--epochs", type=click.IntRange(1), default=default(DetrTrainSettings, "epochs"), show_default=True)
@click.option("--lr-drop", type=click.IntRange(1), default=default(DetrTrainSettings, "lr_drop"), show_default=True,
              help="Multiply the learning rates by 0.1 every N epochs (StepLR).")
@click.option("--batch-size", type=click.IntRange(1), default=default(DetrTrainSettings, "batch_size"),
              show_default=True, help="Images per step and process.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=default(DetrTrainSettings, "lr"),
              show_default=True, help="AdamW's learning rate outside the backbone.")
@click.option("--lr-backbone", type=click.FloatRange(0), default=default(DetrTrainSettings, "lr_backbone"),
              show_default=True, help="The backbone's (layer2-4; 0 freezes it all).")
@click.option("--full-backbone", is_flag=True, default=default(DetrTrainSettings, "full_backbone"),
              help="Train the whole backbone, stem and layer1 too, with batch norms that learn their statistics "
                   "(for --weights random: the official recipe assumes an ImageNet backbone).")
@click.option("--weight-decay", type=click.FloatRange(0), default=default(DetrTrainSettings, "weight_decay"),
              show_default=True)
@click.option("--clip-max-norm", type=click.FloatRange(0), default=default(DetrTrainSettings, "clip_max_norm"),
              show_default=True, help="Clip the gradients to this norm (0: no clipping).")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=default(DetrTrainSettings, "dropout"),
              show_default=True, help="In the transformer, while training.")
@click.option("--seed", type=int, default=default(DetrTrainSettings, "seed"), show_default=True,
              help="Data order, flips and dropout (the initial weights come from --weights).")
@click.option("--out", default=default(DetrTrainSettings, "out"), help="Run folder [default: <root>/detr/MODEL].")
@click.option("--resume", is_flag=True, default=default(DetrTrainSettings, "resume"),
              help="Continue the run in --out from its last.pth.")
@click.option("--num-workers", type=click.IntRange(0), default=default(DetrTrainSettings, "num_workers"),
              show_default=True, help="DataLoader processes decoding and resizing images.")
@device_option
@amp_option
@dist_timeout_option
def train_detr_command(model_name: str, weights: str, source: str, split: str, val_split: str,
                       synthetic_images: int | None, synthetic_val_images: int | None, coco_root: Path, root: Path,
                       size: tuple[int, int], epochs: int, lr_drop: int, batch_size: int, lr: float,
                       lr_backbone: float, full_backbone: bool, weight_decay: float, clip_max_norm: float,
                       dropout: float, seed: int,
                       out: str | None, resume: bool, num_workers: int, device: str | None, amp: str | None,
                       dist_timeout: float) -> None:
    """Train DETR itself on a COCO-format split, resized to --size as the cache is (torchrun: data-parallel).

    The official recipe (facebookresearch/detr): Hungarian matching; cross-entropy (no-object
    weight 0.1) + 5·L1 + 2·GIoU on every decoder layer; AdamW, lr 1e-4, backbone 1e-5 (its
    stem and layer1 frozen), weight decay 1e-4; gradients clipped to norm 0.1; dropout 0.1;
    learning rates ×0.1 every --lr-drop epochs; random horizontal flips. After every epoch:
    the validation split's box AP (as `analyze ap` scores it), best.safetensors (the highest
    AP), last.pth (the official checkpoint layout, for --resume) and a line of metrics.jsonl.
    Both checkpoints load with --weights PATH wherever a DETR is built. Reads COCO folders and
    the synthetic source (not webdataset shards).
    """
    from invcache.cli.display import TrainDisplay
    from invcache.distributed import process_group
    from invcache.training.detr import train_detr

    settings = DetrTrainSettings(
        model=model_name, weights=weights, source=source, coco_root=coco_root, workspace=root, split=split,
        val_split=val_split, size=size, epochs=epochs, lr_drop=lr_drop, batch_size=batch_size, lr=lr,
        lr_backbone=lr_backbone, full_backbone=full_backbone, weight_decay=weight_decay, clip_max_norm=clip_max_norm,
        dropout=dropout, seed=seed,
        out=out, resume=resume, device=device, amp=amp, num_workers=num_workers, synthetic_images=synthetic_images,
        synthetic_val_images=synthetic_val_images,
    )
    with process_group(dist_timeout) as (rank, _world), TrainDisplay() as display:
        result = train_detr(settings, progress=display if rank == 0 else None)
    if rank == 0:
        console.print(f"detr: {result.steps} steps, best validation AP {result.best_ap:.4f}; checkpoints in "
                      f"{result.out} (best.safetensors, last.pth)")


@cli.group(context_settings={"help_option_names": ["-h", "--help"]})
def analyze() -> None:
    """The paper's analyses, read from a cache and trained modules; results under <root>/analysis/.

    Only the perturbation studies (grayscale, color) run DETR, once, to make caches of the
    perturbed images beside the evaluation cache; reruns reuse them. tradeoff fine-tunes DETR,
    so it reads the caches' images, not their activations."""


def _analysis_settings(root: Path, cache: str | None, modules: str | None, out: str | None, n: int,
                       batch_size: int, device: str | None, mean_from: str | None) -> AnalyzeSettings:
    return AnalyzeSettings(workspace=root, cache=cache, modules=modules, out=out, n=n, batch_size=batch_size,
                           device=device, mean_from=mean_from)


def _show(name: str, results: dict, out: Path) -> None:
    """The analysis' headline figures, and where its files are."""
    from rich.table import Table

    table = Table(title=f"analyze {name}: {results.get('images', '?')} image(s)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for label, value in results.get("headline", {}).items():
        table.add_row(label, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
    console.print(f"results: {out / 'results.json'}")


_STAGE_HELP = "backbone, encoder, decoder, head (comma list) or all."
_PERTURBED_LAYERS_HELP = ("Taps the perturbed caches hold (comma list, e.g. all) [default: those the chains and AP "
                          "read].")


def _stage_list(text: str) -> list[str]:
    from invcache.chain import STAGES

    return list(STAGES) if text == "all" else [s.strip() for s in text.split(",") if s.strip()]


def _layer_list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


@analyze.command("stages")
@analysis_options
@click.option("--stage", "stages", default="all", show_default=True, help=_STAGE_HELP)
@click.option("--ids", default=None, help="COCO image ids the grid shows (comma list) instead of the first --n.")
def analyze_stages(root: Path, cache: str | None, modules: str | None, out: str | None, n: int, batch_size: int,
                   device: str | None, mean_from: str | None, stages: str, ids: str | None) -> None:
    """MSE per stage (backbone, encoder, decoder, head) with 95% CIs, bar chart and reconstruction grid."""
    from invcache.analysis import stages as analysis

    settings = _analysis_settings(root, cache, modules, out, n, batch_size, device, mean_from)
    chosen = _stage_list(stages)
    try:
        id_list = [int(i) for i in ids.split(",")] if ids else None
    except ValueError:
        raise UsageError(f"bad --ids {ids!r}: expected a comma list of integers") from None
    results = analysis.run(settings, stages=chosen, ids=id_list)
    _show("stages", results, settings.out_dir(analysis.NAME))


@analyze.command("inter-layer")
@analysis_options
@click.option("--cka/--no-cka", default=True, show_default=True, help="Linear CKA between all cached layers.")
def analyze_inter_layer(root: Path, cache: str | None, modules: str | None, out: str | None, n: int,
                        batch_size: int, device: str | None, mean_from: str | None, cka: bool) -> None:
    """Every encoder and decoder layer through the inverse chains: MSE per layer, grid, and layer-to-layer CKA."""
    from invcache.analysis import inter_layer as analysis

    settings = _analysis_settings(root, cache, modules, out, n, batch_size, device, mean_from)
    _show("inter-layer", analysis.run(settings, cka=cka), settings.out_dir(analysis.NAME))


@analyze.command("onehot")
@analysis_options
def analyze_onehot(root: Path, cache: str | None, modules: str | None, out: str | None, n: int, batch_size: int,
                   device: str | None, mean_from: str | None) -> None:
    """Head-stage reconstructions from one-hot class input against the full softmax scores."""
    from invcache.analysis import onehot as analysis

    settings = _analysis_settings(root, cache, modules, out, n, batch_size, device, mean_from)
    _show("onehot", analysis.run(settings), settings.out_dir(analysis.NAME))


@analyze.command("ap")
@analysis_options
@click.option("--annotations", default=None,
              help="COCO annotation file [default: the one the cache records, checked by sha256].")
def analyze_ap(root: Path, cache: str | None, modules: str | None, out: str | None, n: int, batch_size: int,
               device: str | None, mean_from: str | None, annotations: str | None) -> None:
    """COCO box AP of DETR from the cached head outputs (DETR is not run)."""
    from invcache.analysis import ap as analysis

    settings = _analysis_settings(root, cache, modules, out, n, batch_size, device, mean_from)
    _show("ap", analysis.run(settings, annotations=annotations), settings.out_dir(analysis.NAME))


@analyze.command("grayscale")
@analysis_options
@click.option("--stage", "stages", default="all", show_default=True, help=_STAGE_HELP)
@click.option("--layers", default=None, help=_PERTURBED_LAYERS_HELP)
@click.option("--annotations", default=None,
              help="COCO annotation file for AP [default: the one the cache records, checked by sha256].")
def analyze_grayscale(root: Path, cache: str | None, modules: str | None, out: str | None, n: int, batch_size: int,
                      device: str | None, mean_from: str | None, stages: str, layers: str | None,
                      annotations: str | None) -> None:
    """Gray inputs against colour inputs: colourfulness of each stage's reconstructions, MSE, AP.

    Extracts the evaluation images again with --transform grayscale (once; reruns reuse the cache)."""
    from invcache.analysis import grayscale as analysis

    settings = _analysis_settings(root, cache, modules, out, n, batch_size, device, mean_from)
    results = analysis.run(settings, stages=_stage_list(stages), layers=_layer_list(layers), annotations=annotations)
    _show("grayscale", results, settings.out_dir(analysis.NAME))


@analyze.command("color")
@analysis_options
@click.option("--categories", default=",".join(COLOR_CATEGORIES), show_default=True,
              help="Category names of the annotations (comma list).")
@click.option("--min-area", type=click.FloatRange(0, 1, min_open=True), default=COLOR_MIN_AREA, show_default=True,
              help="An image is selected when one instance of the category (not crowd) covers this share of it.")
@click.option("--stage", "stages", default="all", show_default=True, help=_STAGE_HELP)
@click.option("--layers", default=None, help=_PERTURBED_LAYERS_HELP)
@click.option("--annotations", default=None,
              help="COCO annotation file (masks, AP) [default: the one the cache records, checked by sha256].")
def analyze_color(root: Path, cache: str | None, modules: str | None, out: str | None, n: int, batch_size: int,
                  device: str | None, mean_from: str | None, categories: str, min_area: float, stages: str,
                  layers: str | None, annotations: str | None) -> None:
    """The colour case study: five hue filters on each category's objects against the identity round trip.

    Extracts each category's selected images once per filter (reruns reuse the caches)."""
    from invcache.analysis import color as analysis

    settings = _analysis_settings(root, cache, modules, out, n, batch_size, device, mean_from)
    names = [c.strip() for c in categories.split(",") if c.strip()]
    results = analysis.run(settings, categories=names, min_area=min_area, stages=_stage_list(stages),
                           layers=_layer_list(layers), annotations=annotations)
    _show("color", results, settings.out_dir(analysis.NAME))


@analyze.command("tradeoff")
@analysis_options
@click.option("--lambdas", default=",".join(f"{lam:g}" for lam in TRADEOFF_LAMBDAS), show_default=True,
              help="Weights λ of the reconstruction loss, in [0, 1] (comma list): one fine-tuning run each.")
@click.option("--epochs", type=click.IntRange(1), default=TRADEOFF_EPOCHS, show_default=True,
              help="Epochs of fine-tuning per λ (the authors' code: 100, with --batch-size 16).")
@click.option("--train-cache", default=None,
              help="Cache whose images fine-tune [default: <root>/cache/train2017].")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=TRADEOFF_LR, show_default=True,
              help="Adam's learning rate for DETR and for each module.")
@click.option("--annotations", default=None,
              help="COCO annotation file of the evaluation images [default: the one the cache records].")
@click.option("--train-annotations", default=None,
              help="COCO annotation file of the training images [default: the one the training cache records].")
def analyze_tradeoff(root: Path, cache: str | None, modules: str | None, out: str | None, n: int, batch_size: int,
                     device: str | None, mean_from: str | None, lambdas: str, epochs: int, train_cache: str | None,
                     lr: float, annotations: str | None, train_annotations: str | None) -> None:
    """Fine-tune DETR with D⁻¹, E⁻¹, B⁻¹ on (1-λ)·L_det + λ·L_rec for each λ: AP and decoder-chain MSE against λ.

    Starts from the DETR the evaluation cache was made with and the trained modules, with the
    authors' settings (Adam, gradients clipped to norm 0.1). Fine-tuning changes DETR, so it
    reads images (the caches' stored input) and annotations, never cached activations, and runs
    DETR on every step. Each λ's run (checkpoints, resumed by a rerun; a finished one is only
    evaluated) goes to <out>/runs/lambda-<λ>/. --batch-size is the fine-tuning batch too."""
    from invcache.analysis import tradeoff as analysis

    settings = _analysis_settings(root, cache, modules, out, n, batch_size, device, mean_from)
    try:
        values = [float(v) for v in lambdas.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"bad --lambdas {lambdas!r}: expected a comma list of numbers in [0, 1]") from None
    results = analysis.run(settings, lambdas=values, epochs=epochs, train_cache=train_cache, lr=lr,
                           annotations=annotations, train_annotations=train_annotations)
    _show("tradeoff", results, settings.out_dir(analysis.NAME))


@cli.command("report")
@click.argument("root", required=False, type=click.Path(path_type=Path), envvar=ROOT_ENV, default=DEFAULT_ROOT)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="[default: <root>/report.html]")
def report_command(root: Path, out: Path | None) -> None:
    """One self-contained HTML page of every analysis under ROOT, with the provenance of its caches and modules."""
    from invcache.analysis.report import build_report

    console.print(f"report: {build_report(root, out)}")


def _input_codec_text(record: dict | None) -> str:
    """How ``input`` is stored, from the codec record's ``input`` entry (absent in caches made before it)."""
    if record is None:
        return "blosc (as every tap)"
    return f"{record['name']} {record.get('configuration', {})}"


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
    _show_library_log()
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
    except OSError as exc:  # the filesystem refused (full disk, read-only, permissions): say which path and why
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"invcache: error: {where}{exc.strerror or exc}", file=sys.stderr)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


def _show_library_log() -> None:
    """The library logs notes (disk estimate, partly extracted caches) to the ``invcache`` logger; show them."""
    import logging

    logger = logging.getLogger("invcache")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
