"""Options that several commands share, each declared once.

Defaults come from the settings dataclasses (``invcache.settings``) and the workspace and data
constants, so the CLI and the Python API cannot disagree. Nothing here imports torch: ``--help``
builds from this module alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from invcache.data import DEFAULT_COCO_ROOT, SOURCES, SYNTHETIC_IMAGES
from invcache.settings import DIST_TIMEOUT_S, AnalyzeSettings, ExtractSettings, default
from invcache.workspace import DEFAULT_ROOT, ROOT_ENV

Command = TypeVar("Command", bound=Callable)

# torch's autocast dtypes by name (invcache.forward.AMP_DTYPES, which needs torch to import)
AMP_CHOICES = ("bf16", "fp16", "off")


def _size(ctx: click.Context, param: click.Parameter, value: str | tuple[int, int]) -> tuple[int, int]:
    from invcache.data import parse_size

    return parse_size(value) if isinstance(value, str) else value


def root_option(f: Command) -> Command:
    return click.option("--root", type=click.Path(path_type=Path), envvar=ROOT_ENV, default=DEFAULT_ROOT,
                        show_default=True, show_envvar=True,
                        help="Workspace: caches in <root>/cache/<split>, modules in <root>/modules/<name>.")(f)


def coco_root_option(f: Command) -> Command:
    return click.option("--coco-root", type=click.Path(path_type=Path), envvar="COCO_ROOT",
                        default=DEFAULT_COCO_ROOT, show_default=True, show_envvar=True,
                        help="COCO in the official layout: <coco-root>/<split>/, <coco-root>/annotations/.")(f)


def device_option(f: Command) -> Command:
    return click.option("--device", default=default(ExtractSettings, "device"),
                        help="cpu, cuda or cuda:N [default: this rank's GPU if there is one, else cpu]")(f)


def amp_option(f: Command) -> Command:
    return click.option("--amp", type=click.Choice(AMP_CHOICES), default=default(ExtractSettings, "amp"),
                        help="Autocast dtype [default: bf16 on CUDA, off elsewhere].")(f)


def model_option(f: Command) -> Command:
    return click.option("--model", "model_name", default=default(ExtractSettings, "model"), show_default=True)(f)


def weights_option(f: Command) -> Command:
    return click.option("--weights", default=default(ExtractSettings, "weights"), show_default=True,
                        help="official, demo (detr-tiny trained on the synthetic shapes, shipped), random[:SEED], "
                             "or a checkpoint path (official, HF, or `invcache train detr`'s).")(f)


def size_option(f: Command) -> Command:
    height, width = default(ExtractSettings, "size")
    return click.option("--size", default=f"{height}x{width}", show_default=True, callback=_size,
                        help="Resize to HxW (multiples of 32).")(f)


def source_option(f: Command) -> Command:
    return click.option("--source", type=click.Choice(SOURCES), default=default(ExtractSettings, "source"),
                        show_default=True, help="COCO folders, or a generated synthetic COCO-format dataset.")(f)


def synthetic_images_option(f: Command) -> Command:
    sizes = ", ".join(f"{count} {split}" for split, count in SYNTHETIC_IMAGES.items())
    return click.option("--synthetic-images", type=click.IntRange(1), default=default(ExtractSettings,
                        "synthetic_images"), help=f"Size of a generated synthetic split; needed for a split name "
                        f"other than {', '.join(SYNTHETIC_IMAGES)} [default: {sizes}].")(f)


def wds_option(f: Command) -> Command:
    return click.option("--wds", "wds_pattern", default=default(ExtractSettings, "wds"), metavar="URL-PATTERN",
                        help="Read the split from webdataset shards, e.g. the pattern `invcache to-wds` prints: "
                             "shards/coco-val2017-{000000..000003}.tar.")(f)


def dist_timeout_option(f: Command) -> Command:
    return click.option("--dist-timeout", type=click.FloatRange(0, min_open=True), default=DIST_TIMEOUT_S,
                        show_default=True, metavar="SECONDS",
                        help="Under torchrun: how long a rank waits for the others at a collective.")(f)


def analysis_options(f: Command) -> Command:
    """What every analysis takes: the workspace, the evaluation cache, the modules, the output, the grid size."""
    for option in reversed([
        root_option,
        click.option("--cache", default=default(AnalyzeSettings, "cache"),
                     help="Evaluation cache [default: <root>/cache/val2017]."),
        click.option("--modules", default=default(AnalyzeSettings, "modules"),
                     help="Folder of trained modules [default: <root>/modules]."),
        click.option("--out", default=default(AnalyzeSettings, "out"),
                     help="Results folder [default: <root>/analysis/NAME]."),
        click.option("--n", type=click.IntRange(1), default=default(AnalyzeSettings, "n"), show_default=True,
                     help="Images the grids show (every valid image is evaluated)."),
        click.option("--batch-size", type=click.IntRange(1), default=default(AnalyzeSettings, "batch_size"),
                     show_default=True),
        device_option,
        click.option("--mean-from", default=default(AnalyzeSettings, "mean_from"),
                     help="Cache whose mean image is the baseline [default: B⁻¹'s training cache]."),
    ]):
        f = option(f)
    return f
