"""The settings of each command, and their defaults, defined once.

The API takes these dataclasses; the CLI builds its options' defaults from them, so the two
cannot disagree. This module imports nothing heavy: ``invcache --help`` reads it without
loading torch or zarr.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from invcache.errors import UsageError
from invcache.workspace import TRAIN_SPLIT, VAL_SPLIT, Workspace, derived_cache

DEFAULT_SIZE = (480, 640)
DECODE_CHOICES = ("auto", "cpu", "device")
DEFAULT_SHARD_SIZE = 256
# How long a rank waits for the others at a collective before giving up (torchrun runs). Ranks
# legitimately wait long (rank 0 reads every webdataset tar's metadata before the others
# start); a rank that fails tears its group down, so failures do not wait for this.
DIST_TIMEOUT_S = 7200.0
# The colour study (``analyze color``): the paper's categories, and the share of the image one of
# their instances must cover for an image to be selected.
COLOR_CATEGORIES = ("stop sign", "bear", "apple", "bus")
COLOR_MIN_AREA = 0.3
# The λ trade-off (``analyze tradeoff``): the paper's λ values, the epochs of fine-tuning (one is a demo; the
# authors' code runs 100 at batch size 16) and the authors' Adam learning rate for DETR and for each module.
TRADEOFF_LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)
TRADEOFF_EPOCHS = 1
TRADEOFF_LR = 1e-5
# The training reader (invcache.cache.batches.CacheBatches): how many rows it shuffles together, as whole
# shards (at least this many rows: 4 shards of 256), the most threads it decodes shards in by default, and
# how many batches it gathers ahead of the one in use.
SHUFFLE_WINDOW = 1024
MAX_DECODE_THREADS = 4
PREFETCH_BATCHES = 2


def _cores() -> int:
    return os.cpu_count() or 1


def default_decode_threads() -> int:
    """Threads the training reader decodes shards in unless told: the cores, at most :data:`MAX_DECODE_THREADS`."""
    return max(1, min(MAX_DECODE_THREADS, _cores()))


@dataclass
class ExtractSettings:
    """``invcache extract``: which images, which model and taps, where the cache goes, how to run."""

    split: str
    layers: str = "all"
    source: str = "coco"
    wds: str | None = None
    coco_root: str | os.PathLike | None = None
    workspace: str | os.PathLike | None = None
    out: str | os.PathLike | None = None
    model: str = "detr-r50"
    weights: str = "official"
    size: tuple[int, int] = DEFAULT_SIZE
    batch_size: int = 16
    num_workers: int = field(default_factory=lambda: min(8, _cores()))
    device: str | None = None
    amp: str | None = None
    limit: int | None = None
    # Perturbations applied after decoding, before resizing, in order (``grayscale``,
    # ``hue:<target>@<category>``; invcache.data.transforms), and the image ids to keep
    # (None: the whole split; --limit applies after).
    transforms: tuple[str, ...] = ()
    ids: tuple[int, ...] | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    keepbits: int | None = None
    overwrite: bool = False
    strict: bool = False
    force: bool = False
    writers: int = field(default_factory=lambda: max(2, min(8, _cores() // 4)))
    synthetic_images: int | None = None
    # cuDNN autotuning speeds up convolutions but picks kernels per run, so a resumed
    # extraction on GPU may differ in the last bits from an uninterrupted one: opt-in.
    cudnn_benchmark: bool = False
    # Where JPEGs are decoded (DECODE_CHOICES): "cpu" in DataLoader workers with PIL, "device" in
    # batches on the model's device (nvjpeg on CUDA; invcache.data.device_decode), "auto" the
    # device when it is CUDA and no perturbation is set, else the CPU.
    decode: str = "auto"

    def cache_location(self) -> str:
        """``--out``, else ``<root>/cache/<split>``, or with transforms the cache beside it that
        :func:`invcache.workspace.derived_cache` names (never the clean cache's folder)."""
        if self.out is not None:
            return os.fspath(self.out)
        location = Workspace.at(self.workspace).cache(self.split)
        if not self.transforms:
            return os.fspath(location)
        from invcache.data.transforms import parse_transform  # numpy: loaded only when there is a transform

        return os.fspath(derived_cache(location, "+".join(parse_transform(t).slug for t in self.transforms)))


@dataclass
class TrainSettings:
    """``invcache train NAME``: which module, from which tap and cache, and the optimisation."""

    name: str
    cache: str | None = None
    val_cache: str | None = None
    workspace: str | os.PathLike | None = None
    from_tap: str | None = None
    epochs: int = 100
    batch_size: int = 128
    lr: float | None = None
    amp: str | None = None
    out: str | os.PathLike | None = None
    resume: bool = False
    seed: int = 0
    # Deprecated and ignored: the reader gathers batches in threads, without DataLoader worker processes.
    num_workers: int | None = None
    decode_threads: int = field(default_factory=default_decode_threads)
    width: str = "full"
    class_input: str = "onehot"
    device: str | None = None
    shuffle_window: int = SHUFFLE_WINDOW  # rows shuffled together (whole shards); changes the data order
    log_every: int = 10

    def out_dir(self) -> Path:
        """``--out``, else ``<root>/modules/<name>[-from-<tap>][-scores]`` (variants never share a folder)."""
        if self.out:
            return Path(self.out)
        suffix = f"-from-{self.from_tap}" if self.from_tap else ""
        suffix += "-scores" if self.class_input == "scores" else ""
        return Workspace.at(self.workspace).module(f"{self.name}{suffix}")


@dataclass
class DetrTrainSettings:
    """``invcache train detr``: DETR itself on a COCO-format split, with the official recipe's defaults.

    facebookresearch/detr's ``main.py`` defaults: AdamW, lr 1e-4 (backbone 1e-5), weight decay
    1e-4, gradient clipping at norm 0.1, dropout 0.1, 300 epochs with the learning rate ×0.1
    after 200, batch size 2 per process. Images are resized to ``size`` as the cache does.
    """

    model: str = "detr-r50"
    weights: str = "random:0"  # where training starts: anything build_detr takes
    source: str = "coco"
    coco_root: str | os.PathLike | None = None
    workspace: str | os.PathLike | None = None
    split: str = TRAIN_SPLIT
    val_split: str = VAL_SPLIT
    size: tuple[int, int] = DEFAULT_SIZE
    epochs: int = 300
    lr_drop: int = 200
    batch_size: int = 2
    lr: float = 1e-4
    lr_backbone: float = 1e-5  # 0 freezes the whole backbone
    full_backbone: bool = False  # train the stem, layer1 and the batch norms too (for a backbone not pretrained)
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1  # 0: no clipping
    dropout: float = 0.1
    seed: int = 0  # data order, flips and dropout (the initial weights come from ``weights``)
    out: str | os.PathLike | None = None
    resume: bool = False
    device: str | None = None
    amp: str | None = None
    num_workers: int = field(default_factory=lambda: min(8, _cores()))
    synthetic_images: int | None = None  # size of a generated synthetic training split
    synthetic_val_images: int | None = None  # and of the validation split
    log_every: int = 10

    def out_dir(self) -> Path:
        """``--out``, else ``<root>/detr/<model>``."""
        return Path(self.out) if self.out else Workspace.at(self.workspace).detr(self.model)


@dataclass
class AnalyzeSettings:
    """``invcache analyze NAME``: which cache and modules, where results go, how many images the grids show."""

    workspace: str | os.PathLike | None = None
    cache: str | None = None
    modules: str | os.PathLike | None = None
    out: str | os.PathLike | None = None
    n: int = 8
    batch_size: int = 32
    device: str | None = None
    mean_from: str | None = None  # the cache whose mean image is the baseline [default: B⁻¹'s training cache]

    def __post_init__(self) -> None:
        if self.n < 1 or self.batch_size < 1:
            raise UsageError(f"n and batch_size must be at least 1 (got n={self.n}, batch_size={self.batch_size})")

    def cache_location(self) -> str:
        """``--cache``, else the workspace's validation split."""
        return self.cache or str(Workspace.at(self.workspace).cache(VAL_SPLIT))

    def modules_dir(self) -> Path:
        return Path(self.modules) if self.modules else Workspace.at(self.workspace).modules

    def out_dir(self, name: str) -> Path:
        return Path(self.out) if self.out else Workspace.at(self.workspace).analysis(name)


def default(settings: type, name: str):
    """The default of one field of a settings dataclass (what the CLI shows and uses)."""
    for f in fields(settings):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            break
    raise KeyError(f"{settings.__name__} has no default for {name!r}")
