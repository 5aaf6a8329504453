"""``invcache train detr``: DETR itself, with facebookresearch/detr's recipe, on a COCO-format split.

Read top to bottom like :mod:`invcache.training.loop`: :func:`prepare` opens the splits and builds
(or restores) the model, optimizer and schedule; :func:`train_step` is one optimizer step (what
``benchmarks/detr_train.py`` times); :func:`train_epoch` runs one epoch; :func:`evaluate` is the
validation AP; :func:`save_epoch` writes the checkpoints and the metrics line; :func:`train_detr`
strings them together.

The recipe is the official ``main.py``'s (:class:`invcache.settings.DetrTrainSettings`): the
Hungarian loss with auxiliary losses (:class:`invcache.models.loss.SetCriterion`); AdamW at lr
1e-4, the backbone at 1e-5, weight decay 1e-4; gradients clipped to norm 0.1; dropout 0.1 in
the transformer; the learning rate ×0.1 every ``lr_drop`` epochs (StepLR). As in the official
code the backbone's batch norms stay frozen and so do its stem and ``layer1``
(``lr_backbone`` 0 freezes all of it); ``full_backbone``, for a backbone that is not pretrained,
trains all of it, with batch norms that normalize by batch statistics and learn the running
statistics the checkpoints then hold as frozen ones. Images are the fixed-size ones the cache holds
(:mod:`invcache.data.detection`), randomly flipped.

After each epoch the model's own head outputs on the validation split are scored by the code
of ``analyze ap`` (:func:`invcache.analysis.ap.coco_detections`, :func:`~invcache.analysis.ap.evaluate_bbox`).
``best`` is the epoch with the highest validation AP (COCO's AP at IoU 0.50:0.95): on simple
data AP50 saturates early while AP still tells epochs apart.

Checkpoints in ``out``, both loadable with ``--weights PATH`` / ``build_detr(name, PATH)``:
``best.safetensors`` holds the weights alone under the official key names; ``last.pth`` is the
official training checkpoint (``model``, ``optimizer``, ``lr_scheduler``, ``epoch`` — the 0-based
epoch just finished — and ``args``, here the settings) plus ``step``, ``best_ap``, ``history``
and ``grad_scaler``; ``metrics.jsonl`` has one line per epoch. ``resume`` continues from
``last.pth``; as data order, flips and dropout depend only on (seed, epoch, rank), the resumed
run ends where the uninterrupted one ends. A loss that is not finite stops the run, before its
gradients are computed, with one line naming the epoch, the step and the batch's images; what
is saved is left as it was, so the last good checkpoint stays. The losses are summed on the
device and read back every ``log_every`` steps, for the display, and at the end of an epoch;
the one value a step reads is whether its loss is finite (the Hungarian matcher has already
waited for that forward pass on the host).

Under ``torchrun`` (inside :func:`invcache.distributed.process_group`) the model is wrapped in
DistributedDataParallel and every rank takes an equal share of each epoch's images.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from invcache.analysis.ap import coco_detections, evaluate_bbox
from invcache.data import open_split
from invcache.data.coco import CocoFolder
from invcache.data.detection import DetectionImages, collate, epoch_indices
from invcache.data.preprocess import check_size, normalize
from invcache.distributed import barrier, rank0_first, rank_and_world, resolve_device
from invcache.errors import InvcacheError, UsageError
from invcache.forward import resolve_amp
from invcache.models import DETR, build_detr, get_config
from invcache.models.backbone import freeze_batch_norms, thaw_batch_norms
from invcache.models.detr import DetrOutputs
from invcache.models.loss import SetCriterion
from invcache.models.matcher import DetrTarget
from invcache.settings import DetrTrainSettings
from invcache.taps import HEAD_BOXES, HEAD_LOGITS
from invcache.training.loop import TrainProgress, _check_writable

log = logging.getLogger(__name__)

BEST = "best.safetensors"
LAST = "last.pth"
METRICS = "metrics.jsonl"
# The loss terms of the last decoder layer averaged into each epoch's record, next to the weighted total.
LOGGED_TERMS = ("loss_ce", "loss_bbox", "loss_giou", "class_error")


class NonFiniteLoss(InvcacheError):
    """:func:`train_step` met a loss that is not finite (on some rank) and took no step."""


@dataclass
class DetrTrainProgress(TrainProgress):
    """A report to ``train_detr(progress=...)``; the report that ends an epoch carries the validation AP."""

    val_ap: float | None = None
    val_ap50: float | None = None

    def summary(self) -> str:
        return (f"epoch {self.epoch}/{self.epochs}: train loss {_number(self.train_loss)}, validation AP "
                f"{_number(self.val_ap)}, AP50 {_number(self.val_ap50)}")


@dataclass
class DetrTrainResult:
    out: Path
    epochs: int
    steps: int
    best_ap: float
    history: list[dict]
    model: DETR


class DetectionForward(nn.Module):
    """DETR's training forward (every decoder layer's predictions) as a ``forward``, so that
    DistributedDataParallel, which synchronizes the gradients of what its ``forward`` runs, can wrap it."""

    def __init__(self, detr: DETR) -> None:
        super().__init__()
        self.detr = detr

    def forward(self, images: torch.Tensor) -> DetrOutputs:
        return self.detr.detection_outputs(images)


@dataclass
class DetrRun:
    """Everything :func:`prepare` resolves: data, model, optimizer, schedule, and where the run stands."""

    settings: DetrTrainSettings
    train_data: DetectionImages
    val_data: DetectionImages
    device: torch.device
    amp: torch.dtype | None
    rank: int
    world: int
    out: Path
    model: DETR
    trainee: nn.Module  # DetectionForward of the model, wrapped in DDP under torchrun
    criterion: SetCriterion
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR
    scaler: torch.amp.GradScaler
    start_epoch: int = 0
    step: int = 0
    best: float = -math.inf
    history: list[dict] = field(default_factory=list)
    reported: set[int] = field(default_factory=set)  # unreadable images already named in the log


def train_detr(settings: DetrTrainSettings, progress: Callable[[DetrTrainProgress], None] | None = None
               ) -> DetrTrainResult:
    """Train (or resume) DETR; under torchrun call it inside :func:`invcache.distributed.process_group`."""
    run = prepare(settings)
    for epoch in range(run.start_epoch, settings.epochs):
        started = time.perf_counter()
        lrs = [group["lr"] for group in run.optimizer.param_groups]
        losses = train_epoch(run, epoch, progress)
        validation = evaluate(run.model, run.val_data, settings.batch_size, settings.num_workers, run.device,
                              run.amp, run.rank, run.world)
        _report_skipped(run, validation["skipped"], "validation")
        run.scheduler.step()
        record = {"epoch": epoch + 1, "step": run.step, **losses,
                  **{f"val_{name}": value for name, value in validation["ap"].items()},
                  "val_images": validation["images"], "lr": lrs[0], "lr_backbone": lrs[1] if len(lrs) > 1 else 0.0,
                  "seconds": round(time.perf_counter() - started, 3)}
        save_epoch(run, record)
        if progress:
            progress(DetrTrainProgress(epoch + 1, settings.epochs, 0, 0, 0.0, losses["train_loss"], epoch_done=True,
                                       val_ap=record["val_AP"], val_ap50=record["val_AP50"]))
    # Frozen and in eval mode, as build_detr returns a model: on the CPU, inference with parameters that
    # require gradients takes other kernels, whose results differ from the loaded checkpoint's in the last bits.
    freeze_batch_norms(run.model.backbone)
    run.model.requires_grad_(False).eval()
    return DetrTrainResult(run.out, settings.epochs, run.step, run.best, run.history, run.model)


def prepare(settings: DetrTrainSettings) -> DetrRun:
    """Open and check both splits, build the model and its optimizer, and restore ``last.pth`` when resuming."""
    _check_settings(settings)
    rank, world = rank_and_world()
    device = resolve_device(settings.device, rank)
    config = get_config(settings.model)
    # Rank 0 first: a synthetic split is generated on first use, and only one process may write it.
    train_images, val_images = rank0_first(lambda: _open_splits(settings), lambda: _open_splits(settings), rank, world)
    train_data = DetectionImages(train_images, config.num_classes, settings.seed, flip=True)
    val_data = DetectionImages(val_images, config.num_classes)
    if not _has_ground_truth(val_images):
        raise UsageError(f"the validation split {settings.val_split} ({val_images.annotation_file}) has no "
                         "annotation (not crowd) to compute AP against; choose another --val-split")

    out = settings.out_dir()
    if rank == 0:  # the one rank that writes
        _check_writable(out, "--out" if settings.out else "the run folder")
    last = out / LAST
    if last.exists() and not settings.resume:
        raise InvcacheError(f"{out} already holds a training run; pass --resume to continue it or --out elsewhere")
    resuming = settings.resume and last.exists()
    # A resumed run's weights are last.pth's, read as --weights reads any official checkpoint. The modules'
    # default initialisation, overwritten by the weights, must not draw from the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        model = build_detr(settings.model, str(last) if resuming else settings.weights, device)
    make_trainable(model, train_backbone=settings.lr_backbone > 0, full_backbone=settings.full_backbone)
    optimizer = torch.optim.AdamW(parameter_groups(model, settings.lr_backbone), lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    amp = resolve_amp(settings.amp, device)
    run = DetrRun(
        settings, train_data, val_data, device, amp, rank, world, out, model, DetectionForward(model),
        SetCriterion(num_classes=config.num_classes).to(device), optimizer,
        torch.optim.lr_scheduler.StepLR(optimizer, settings.lr_drop),
        torch.amp.GradScaler(device.type, enabled=amp == torch.float16),
    )
    if resuming:
        _restore(run, last)
    if world > 1:
        run.trainee = torch.nn.parallel.DistributedDataParallel(run.trainee)
    return run


def parameter_groups(model: DETR, lr_backbone: float) -> list[dict]:
    """The official optimizer groups: the trained parameters outside the backbone at the base rate, the
    backbone's at ``lr_backbone``."""
    main = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    backbone = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.")]
    return [{"params": main}, *([{"params": backbone, "lr": lr_backbone}] if backbone else [])]


def train_step(model: nn.Module, criterion: SetCriterion, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, images: torch.Tensor, targets: list[DetrTarget],
               amp: torch.dtype | None, clip_max_norm: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step on a batch already on the device: uint8 images (B, H, W, 3) and their targets.

    ``model`` is a :class:`DetectionForward` (or DDP of one). Returns the weighted loss and the
    :data:`LOGGED_TERMS`, detached and still on the device. A loss that is not finite on any
    rank raises :class:`NonFiniteLoss` on every rank before any gradient is computed, so the
    weights stay those of the last good step (thawed batch norms, ``full_backbone``, have already
    updated their running statistics in that forward; :func:`train_detr` then stops without
    saving, so the checkpoints keep the last good ones). Reading that one flag costs no stall: the matcher
    has already waited for this forward on the host.
    """
    with torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
        outputs = model(normalize(images))
    # The matching and the losses in float32, whatever the autocast dtype: GIoU of bf16 boxes is coarse.
    losses = criterion(_as_float(outputs), targets)
    loss = criterion.total(losses)
    if not _finite_on_every_rank(loss):
        raise NonFiniteLoss("the loss is not finite")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_max_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                       clip_max_norm)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), {name: losses[name].detach() for name in LOGGED_TERMS}


def train_epoch(run: DetrRun, epoch: int, progress: Callable[[DetrTrainProgress], None] | None = None
                ) -> dict[str, float]:
    """One epoch over this rank's share of the training split; returns the mean loss terms across ranks."""
    settings = run.settings
    run.train_data.set_epoch(epoch)
    indices = epoch_indices(len(run.train_data), settings.seed, epoch, run.rank, run.world)
    loader = _loader(run.train_data, indices, settings.batch_size, settings.num_workers, run.device,
                     (settings.seed, epoch))
    steps = math.ceil(len(indices) / settings.batch_size)
    run.trainee.train()
    sums = torch.zeros(1 + len(LOGGED_TERMS), dtype=torch.float64, device=run.device)
    taken, seen, started = 0, 0, time.perf_counter()
    # Dropout draws from a generator seeded by (seed, epoch, rank), so a resumed epoch drops what the
    # uninterrupted one dropped; fork_rng leaves the caller's RNG as it was.
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []), \
            dropout(run.model, settings.dropout):
        torch.manual_seed(hash((settings.seed, epoch, run.rank)) & 0x7FFF_FFFF_FFFF_FFFF)
        for done, batch in enumerate(loader, start=1):
            _report_skipped(run, batch["skipped"], "training")
            if not _every_rank_has_images(batch, run):
                continue
            images = batch["input"].to(run.device, non_blocking=True)
            targets = [{k: v.to(run.device, non_blocking=True) for k, v in t.items()} for t in batch["targets"]]
            try:
                loss, terms = train_step(run.trainee, run.criterion, run.optimizer, run.scaler, images, targets,
                                         run.amp, settings.clip_max_norm)
            except NonFiniteLoss:
                raise _stopped(run, epoch, batch["image_id"]) from None
            run.step += 1
            taken += 1
            seen += len(images)
            sums += torch.stack([loss, *(terms[name] for name in LOGGED_TERMS)]).double()
            if progress and (done % settings.log_every == 0 or done == steps):
                progress(DetrTrainProgress(epoch + 1, settings.epochs, done, steps,
                                           seen / (time.perf_counter() - started), sums[0].item() / max(taken, 1)))
    if run.world > 1:
        # DDP hands rank 0's buffers to every rank before each forward, but the last forward updated thawed
        # batch-norm statistics on each rank from its own batch: validation and checkpoints take rank 0's.
        for buffer in run.model.buffers():
            dist.broadcast(buffer, 0)
    means = _mean_across_ranks(sums, taken, run.device, run.world)
    return dict(zip(("train_loss", *LOGGED_TERMS), means))


@torch.no_grad()
def evaluate(model: DETR, data: DetectionImages, batch_size: int, num_workers: int, device: torch.device,
             amp: torch.dtype | None, rank: int = 0, world: int = 1) -> dict:
    """COCO box AP of ``model`` on every readable image of ``data``, scored as ``analyze ap`` scores a cache.

    Each rank forwards its share (each image exactly once); rank 0 gathers the detections,
    evaluates them with :func:`evaluate_bbox` and hands the result to every rank. Returns
    ``ap`` (:data:`invcache.analysis.ap.STATS`), ``per_category``, ``images`` (how many were
    scored) and ``skipped`` ((image id, reason) of this rank's unreadable images).
    """
    indices = epoch_indices(len(data), 0, 0, rank, world, shuffle=False, equal_shares=False)
    was_training = model.training
    model.eval()
    detections, image_ids, skipped = [], [], []
    for batch in _loader(data, indices, batch_size, num_workers, device, (0, -1)):
        skipped += batch["skipped"]
        if not batch["image_id"]:
            continue
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            heads = model(normalize(batch["input"].to(device, non_blocking=True)), [HEAD_LOGITS, HEAD_BOXES])
        detections += coco_detections(batch["image_id"], heads[HEAD_LOGITS].float().cpu(),
                                      heads[HEAD_BOXES].float().cpu(), batch["orig_size"])
        image_ids += batch["image_id"]
    model.train(was_training)
    parts = _gather_to_rank0((detections, image_ids), rank, world)

    def score() -> dict:
        every_detection = [d for part, _ in parts for d in part]
        every_id = [i for _, ids in parts for i in ids]
        if not every_id:
            raise InvcacheError(f"no image of the validation split {data.images.split} could be read; nothing to "
                                "score")
        evaluation = evaluate_bbox(data.images.coco, every_detection, every_id)
        return {"ap": evaluation["ap"], "per_category": evaluation["per_category"], "images": len(every_id)}

    return {**_from_rank0(score, rank, world), "skipped": skipped}


def save_epoch(run: DetrRun, record: dict) -> None:
    """Append the epoch to the history; rank 0 writes ``best.safetensors`` if the validation AP improved,
    ``last.pth`` and the line of ``metrics.jsonl``."""
    run.history.append(record)
    score = _score(record["val_AP"])
    improved = score > run.best
    run.best = max(run.best, score)
    if run.rank == 0:
        if improved:
            metadata = {"format": "pt", "model": run.settings.model, "epoch": str(record["epoch"]),
                        "val_AP": str(record["val_AP"]), "val_AP50": str(record["val_AP50"])}
            _write_atomic(run.out / BEST, lambda p: save_file(_cpu_state(run.model), str(p), metadata=metadata))
        _write_atomic(run.out / LAST, lambda p: torch.save(_training_checkpoint(run, record["epoch"] - 1), p))
        with open(run.out / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
    barrier(run.world)


def _check_settings(settings: DetrTrainSettings) -> None:
    if settings.epochs < 1 or settings.batch_size < 1 or settings.lr_drop < 1 or settings.log_every < 1:
        raise UsageError("--epochs, --batch-size and --lr-drop must be at least 1")
    if not (math.isfinite(settings.lr) and settings.lr > 0):
        raise UsageError(f"--lr must be a positive number, not {settings.lr}")
    for name in ("lr_backbone", "weight_decay", "clip_max_norm"):
        value = getattr(settings, name)
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a number of at least 0, not {value}")
    if settings.full_backbone and settings.lr_backbone == 0:
        raise UsageError("--full-backbone trains the whole backbone; it needs a --lr-backbone above 0")
    check_size(tuple(settings.size))
    if settings.full_backbone and get_config(settings.model).feature_size(tuple(settings.size)) == (1, 1):
        # a batch of one image would leave the last batch norms one value per channel to normalize by
        raise UsageError(f"--full-backbone needs a feature map larger than 1x1; --size {settings.size[0]}x"
                         f"{settings.size[1]} gives 1x1 (use at least 64 on one side)")
    if not 0 <= settings.dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1), not {settings.dropout}")


def _open_splits(settings: DetrTrainSettings) -> tuple[CocoFolder, CocoFolder]:
    common = dict(coco_root=settings.coco_root, workspace=settings.workspace, size=tuple(settings.size))
    return (open_split(settings.source, settings.split, synthetic_images=settings.synthetic_images, **common),
            open_split(settings.source, settings.val_split, synthetic_images=settings.synthetic_val_images, **common))


def _has_ground_truth(images: CocoFolder) -> bool:
    return any(not a.get("iscrowd", 0) for i in images.image_ids for a in images.coco.imgToAnns.get(i, []))


def make_trainable(model: DETR, train_backbone: bool, full_backbone: bool = False) -> None:
    """Unfreeze what the official DETR trains and switch to training mode.

    The official code trains the backbone's ``layer2``–``layer4`` only (and none of it with
    ``train_backbone`` False, i.e. ``lr_backbone`` 0); its batch norms are frozen statistics, not
    parameters. It starts from ImageNet weights; from random ones the stem and ``layer1`` must learn
    too and the statistics must follow the data: ``full_backbone`` trains every backbone layer and
    thaws its batch norms (:func:`~invcache.models.backbone.thaw_batch_norms`).
    """
    if full_backbone:
        thaw_batch_norms(model.backbone)
    model.requires_grad_(True)
    for name, parameter in model.backbone.named_parameters():
        if not train_backbone or not (full_backbone or any(f".layer{k}." in name for k in (2, 3, 4))):
            parameter.requires_grad_(False)
    model.train()


@contextlib.contextmanager
def dropout(model: DETR, rate: float) -> Iterator[None]:
    """The transformer's dropout at ``rate`` inside the block, 0 after it, as :func:`build_detr` makes it.

    Dropout sits where the official layers have it: on the attention weights, after attention,
    inside and after the FFN; it is on only while an epoch trains, so the model that training
    returns is the model its checkpoint loads as.
    """
    def set_rate(value: float) -> None:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = value
            elif isinstance(module, nn.MultiheadAttention):
                module.dropout = value

    set_rate(rate)
    try:
        yield
    finally:
        set_rate(0.0)


def _loader(data: DetectionImages, indices: list[int], batch_size: int, num_workers: int, device: torch.device,
            key: tuple) -> torch.utils.data.DataLoader:
    """Batches of ``indices`` in their order. The loader's own generator (from ``key``) seeds its workers, so
    loading never draws from the caller's RNG; nothing in a worker is random (flips are hashed)."""
    return torch.utils.data.DataLoader(
        data, batch_size=batch_size, sampler=indices, collate_fn=collate, num_workers=num_workers,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(hash(key) & 0x7FFF_FFFF),
    )


def _report_skipped(run: DetrRun, skipped: list[tuple[int, str]], what: str) -> None:
    for image_id, reason in skipped:
        if image_id not in run.reported:
            run.reported.add(image_id)
            log.warning("skipped the unreadable %s image %s: %s", what, image_id, reason)


def _every_rank_has_images(batch: dict, run: DetrRun) -> bool:
    """Whether this step can be taken: the batch holds a readable image, and under DDP so does every rank's.

    A step without images cannot run the loss; under DDP every rank must take the same steps (each
    backward all-reduces the gradients), so the ranks agree through one small collective per step.
    """
    if run.world == 1:
        return bool(batch["image_id"])
    has_images = torch.tensor(float(bool(batch["image_id"])), device=run.device)
    dist.all_reduce(has_images, op=dist.ReduceOp.MIN)
    return bool(has_images.item())


def _finite_on_every_rank(loss: torch.Tensor) -> bool:
    finite = torch.isfinite(loss.detach()).to(torch.float32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def _stopped(run: DetrRun, epoch: int, image_ids: list[int]) -> InvcacheError:
    """The one-line error that stops the run: the epoch, the step, the images of the step on every rank."""
    if run.world > 1:
        parts: list = [None] * run.world
        dist.all_gather_object(parts, image_ids)
        image_ids = [i for part in parts for i in part]
    kept = (f"the last good checkpoint is {run.out / LAST} (epoch {epoch})" if epoch else
            "no checkpoint had been written yet")
    return InvcacheError(f"the loss is not finite at epoch {epoch + 1}, step {run.step + 1} (images "
                         f"{', '.join(str(i) for i in sorted(image_ids))}); training stopped, {kept}")


def _as_float(outputs: DetrOutputs) -> DetrOutputs:
    def cast(predictions: dict) -> dict:
        return {"pred_logits": predictions["pred_logits"].float(), "pred_boxes": predictions["pred_boxes"].float()}

    return {**cast(outputs), "aux_outputs": [cast(aux) for aux in outputs.get("aux_outputs", [])]}


def _cpu_state(model: DETR) -> dict[str, torch.Tensor]:
    """The weights under the official key names (the model's own), contiguous on the CPU."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def _training_checkpoint(run: DetrRun, epoch: int) -> dict:
    """The official ``checkpoint.pth`` layout (``args`` as a plain dict), plus what invcache's resume reads."""
    return {
        "model": _cpu_state(run.model), "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": run.scheduler.state_dict(), "epoch": epoch, "args": _settings_record(run),
        "step": run.step, "best_ap": run.best, "history": run.history, "grad_scaler": run.scaler.state_dict(),
    }


def _settings_record(run: DetrRun) -> dict:
    record = {k: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in asdict(run.settings).items()}
    return {**record, "size": list(record["size"]), "world_size": run.world}


# What a resumed run must share with the saved one to continue it exactly: the data, its order and
# batching, and the optimization. The starting weights, the epoch count and how it runs may change.
_RESUME_SETTINGS = {
    "model": "--model", "size": "--size", "source": "--source", "split": "--split",
    "synthetic_images": "--synthetic-images", "seed": "--seed", "batch_size": "--batch-size", "lr": "--lr",
    "lr_backbone": "--lr-backbone", "weight_decay": "--weight-decay", "clip_max_norm": "--clip-max-norm",
    "lr_drop": "--lr-drop", "dropout": "--dropout", "full_backbone": "--full-backbone",
    "world_size": "the number of torchrun processes",
}


_DEFAULTS = {f.name: f.default for f in fields(DetrTrainSettings) if f.default is not MISSING}


def _restore(run: DetrRun, last: Path) -> None:
    try:
        saved = torch.load(last, map_location="cpu", weights_only=True)
    except Exception as exc:  # the weights already loaded from it, so this is a torn or edited file
        raise InvcacheError(f"{last} cannot be read as a training checkpoint ({exc})") from None
    problem = _checkpoint_problem(saved)
    if problem:
        raise InvcacheError(f"{last}: {problem}; it is not a checkpoint as `invcache train detr` writes it")
    current = _settings_record(run)
    # A setting added after the run was saved reads as its default (the run trained that way).
    before = {key: saved["args"].get(key, _DEFAULTS.get(key)) for key in _RESUME_SETTINGS}
    changed = [f"{flag} {before[key]!r} -> {current[key]!r}" for key, flag in _RESUME_SETTINGS.items()
               if before[key] != current[key]]
    if changed:
        raise InvcacheError(f"cannot resume the run in {run.out} with other data or optimization settings "
                            f"({'; '.join(changed)}); resume with the run's values, or train anew with --out elsewhere")
    try:
        run.optimizer.load_state_dict(saved["optimizer"])
        run.scheduler.load_state_dict(saved["lr_scheduler"])
        if saved["grad_scaler"]:
            run.scaler.load_state_dict(saved["grad_scaler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise InvcacheError(f"{last}: its optimizer, schedule or grad scaler state cannot be restored "
                            f"({exc})") from None
    run.start_epoch, run.step, run.best, run.history = saved["epoch"] + 1, saved["step"], saved["best_ap"], \
        saved["history"]
    if run.rank == 0:  # an append torn by a kill after last.pth was written is healed from the history
        _write_atomic(run.out / METRICS, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in run.history)))


def _checkpoint_problem(saved: object) -> str | None:
    """Why ``saved`` lacks what a resume reads, if it does."""
    if not isinstance(saved, dict):
        return f"it holds a {type(saved).__name__}, not a dict"
    checks = [
        ("epoch", isinstance(saved.get("epoch"), int) and saved["epoch"] >= 0, "a non-negative integer"),
        ("step", isinstance(saved.get("step"), int) and saved["step"] >= 0, "a non-negative integer"),
        ("best_ap", isinstance(saved.get("best_ap"), float), "a number"),
        ("history", isinstance(saved.get("history"), list), "a list"),
        ("args", isinstance(saved.get("args"), dict), "a dict of settings"),
        ("optimizer", isinstance(saved.get("optimizer"), dict), "an optimizer state"),
        ("lr_scheduler", isinstance(saved.get("lr_scheduler"), dict), "a scheduler state"),
        ("grad_scaler", isinstance(saved.get("grad_scaler"), dict), "a grad scaler state"),
    ]
    for key, ok, expected in checks:
        if not ok:
            return f"{key} is {saved.get(key)!r}, not {expected}" if key in saved else f"it has no {key}"
    return None


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)


def _gather_to_rank0(value: object, rank: int, world: int) -> list:
    """Every rank's ``value`` on rank 0 (in rank order); an empty list on the others."""
    if world == 1:
        return [value]
    parts: list | None = [None] * world if rank == 0 else None
    dist.gather_object(value, parts, dst=0)
    return parts or []


def _from_rank0(compute: Callable[[], dict], rank: int, world: int) -> dict:
    """``compute()`` run on rank 0, its result (or its InvcacheError) on every rank."""
    if world == 1:
        return compute()
    box: list = [None]
    if rank == 0:
        try:
            box[0] = (True, compute())
        except InvcacheError as exc:
            box[0] = (False, str(exc))
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise InvcacheError(value)
    return value


def _mean_across_ranks(sums: torch.Tensor, count: int, device: torch.device, world: int) -> list[float]:
    values = torch.cat([sums.to(device, torch.float64), torch.tensor([float(count)], device=device,
                                                                      dtype=torch.float64)])
    if world > 1:
        dist.all_reduce(values)
    *totals, total_count = values.tolist()
    return [t / total_count if total_count else math.nan for t in totals]


def _score(ap: float | None) -> float:
    """The AP that ``best`` maximizes; None (nothing to score) ranks below every AP."""
    return -1.0 if ap is None else ap


def _number(value: float | None) -> str:
    return f"{value:.5f}" if value is not None else "n/a"


__all__ = ["DetectionForward", "DetrRun", "DetrTrainProgress", "DetrTrainResult", "NonFiniteLoss", "dropout",
           "evaluate", "parameter_groups", "prepare", "save_epoch", "train_detr", "train_epoch", "train_step"]
