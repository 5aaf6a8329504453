"""``invcache train NAME``: fit one inverse module from the cache alone — DETR is never built.

Adam at the module's learning rate; one validation pass per epoch on the validation cache
(the training loss stands in without one); ``last`` is saved every epoch (weights,
optimizer, epoch), ``best`` whenever the validation loss improves; one JSON line per epoch
in ``metrics.jsonl``. Data order depends only on (seed, epoch), so a run resumed from
``last`` continues exactly as the uninterrupted run would. Under ``torchrun`` the module is
wrapped in DistributedDataParallel and every rank reads its own shards.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from invcache import taps as T
from invcache.cache import schema as S
from invcache.cache.reader import CacheSamples
from invcache.cache.store import Cache
from invcache.data.preprocess import unit_images
from invcache.distributed import barrier, rank_and_world, resolve_device
from invcache.errors import InvcacheError, UsageError
from invcache.forward import resolve_amp
from invcache.inverse import LEARNING_RATES, build_inverse, inverse_loss, make_spec, run_inverse
from invcache.settings import TrainSettings
from invcache.train import checkpoint


@dataclass
class TrainResult:
    out: Path
    epochs: int
    steps: int
    best_val_loss: float
    history: list[dict]
    module: torch.nn.Module


def train(settings: TrainSettings, progress: Callable[[str, int, int, float], None] | None = None) -> TrainResult:
    """Train (or resume) one module; ``progress(stage, done, total, loss)`` reports steps and validation."""
    if settings.epochs < 1 or settings.batch_size < 1:
        raise UsageError("--epochs and --batch-size must be at least 1")
    rank, world = rank_and_world()
    device = resolve_device(settings.device, rank)
    amp = resolve_amp(settings.amp, device)

    location = settings.cache_location()
    if not Cache.exists(location):
        raise UsageError(f"no cache at {location}; run `invcache extract --split train2017 --layers all` first "
                         "(or pass --cache)")
    cache = Cache.open(location)
    attrs = cache.attrs
    spec = make_spec(settings.name, attrs, from_tap=settings.from_tap, width=settings.width,
                     class_input=settings.class_input)
    taps = [*spec.inputs, spec.target]
    stored = set(cache.taps) | {T.DECODER_INPUT}
    missing = [t for t in taps if t not in stored]
    if missing:
        raise UsageError(f"{location} lacks the taps {', '.join(missing)} that {spec.name} needs; "
                         f"extract them with --layers")
    complete = cache.complete_shards()
    if not complete.any():
        raise UsageError(f"{location} has no complete shard yet; finish its extraction first")
    if not complete.all():
        print(f"warning: {location} is partly extracted ({int(complete.sum())} of {len(complete)} shards); "
              "training on the complete ones", file=sys.stderr)
    fingerprint = checkpoint.cache_fingerprint(attrs)
    val_location = settings.val_location()
    if val_location:
        val_cache = Cache.open(val_location)
        checkpoint.check_compatible(fingerprint, val_cache.attrs, f"the training cache {location}",
                                    f"the validation cache {val_location}")
        missing = [t for t in taps if t not in set(val_cache.taps) | {T.DECODER_INPUT}]
        if missing:
            raise UsageError(f"the validation cache {val_location} lacks the taps {', '.join(missing)}")

    out = settings.out_dir()
    lr = settings.lr or LEARNING_RATES[spec.name]
    torch.manual_seed(settings.seed)
    module = build_inverse(spec).to(device)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    start_epoch, step, best, history, mean_image, scaler_state = 0, 0, math.inf, [], None, None
    if (out / "last.json").exists():
        if not settings.resume:
            raise InvcacheError(f"{out} already holds a training run; pass --resume to continue it or --out elsewhere")
        saved, meta, tensors = checkpoint.load(out, "last")
        if meta["spec"] != spec.to_dict():
            raise InvcacheError(f"{out} holds {meta['spec']}, not {spec.to_dict()}; choose another --out")
        checkpoint.check_compatible(meta["cache"], attrs, f"the run in {out}", f"the cache {location}")
        module.load_state_dict(saved.state_dict())
        checkpoint.load_optimizer_state(optimizer, meta, tensors)
        start_epoch, step, best, history = meta["epoch"], meta["step"], meta["best_val_loss"], meta["history"]
        mean_image = tensors.get("extra.mean_image")
        scaler_state = meta.get("grad_scaler")
    trainee = torch.nn.parallel.DistributedDataParallel(module) if world > 1 else module
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    if scaler_state:
        scaler.load_state_dict(scaler_state)

    meta_base = {
        "spec": spec.to_dict(), "cache": fingerprint, "train_cache": location, "val_cache": val_location,
        "settings": {**asdict(settings), "lr": lr, "world_size": world},
    }
    for epoch in range(start_epoch, settings.epochs):
        started = time.perf_counter()
        samples = CacheSamples(location, taps, seed=settings.seed, epoch=epoch, buffer_size=settings.buffer_size,
                               rank=rank, world=world)
        loader = torch.utils.data.DataLoader(samples, batch_size=settings.batch_size, num_workers=settings.num_workers,
                                             drop_last=world > 1)
        batches = len(samples) / settings.batch_size
        total_steps = int(batches) if world > 1 else math.ceil(batches)
        image_sum, image_count = 0.0, 0
        trainee.train()
        losses = []
        for done, batch in enumerate(loader, start=1):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in taps}
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                prediction = run_inverse(spec, trainee, batch)
            loss = inverse_loss(spec, prediction, batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            losses.append(loss.item())
            if mean_image is None and spec.target == T.INPUT:
                image_sum = image_sum + unit_images(batch[T.INPUT]).sum(0)
                image_count += len(batch[T.INPUT])
            if progress:
                progress("train", done, total_steps, losses[-1])
        train_loss = _mean_across_ranks(sum(losses), len(losses), device, world)
        if mean_image is None and spec.target == T.INPUT:
            mean_image = _image_mean(image_sum, image_count, device, world)
        val_loss = evaluate(spec, module, val_location, settings, device, amp, rank, world) if val_location \
            else train_loss
        if progress:
            progress("val", 1, 1, val_loss)
        record = {"epoch": epoch + 1, "step": step, "train_loss": train_loss, "val_loss": val_loss, "lr": lr,
                  "seconds": round(time.perf_counter() - started, 3)}
        history.append(record)
        if rank == 0:
            extra = {"mean_image": mean_image} if mean_image is not None else None
            improved = val_loss < best
            best = min(best, val_loss)
            meta = {**meta_base, "epoch": epoch + 1, "step": step, "best_val_loss": best, "history": history,
                    "grad_scaler": scaler.state_dict()}
            if improved:
                checkpoint.save(out, "best", module, meta, extra=extra)
            checkpoint.save(out, "last", module, meta, optimizer=optimizer, extra=extra)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        barrier(world)

    return TrainResult(out, settings.epochs, step, best, history, module)


@torch.no_grad()
def evaluate(spec, module, location: str, settings: TrainSettings, device: torch.device, amp, rank: int = 0,
             world: int = 1) -> float:
    """Mean loss per image over every valid image of a cache (each rank takes its share of the shards)."""
    samples = CacheSamples(location, [*spec.inputs, spec.target], shuffle=False, rank=rank, world=world,
                           equal_shares=False)
    loader = torch.utils.data.DataLoader(samples, batch_size=settings.batch_size, num_workers=settings.num_workers)
    was_training = module.training
    module.eval()
    total, count = 0.0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items() if k != S.IMAGE_ID}
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            prediction = run_inverse(spec, module, batch)
        size = len(prediction)
        total += inverse_loss(spec, prediction, batch).item() * size
        count += size
    module.train(was_training)
    return _mean_across_ranks(total, count, device, world)


def _mean_across_ranks(total: float, count: int, device: torch.device, world: int) -> float:
    if world > 1:
        values = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(values)
        total, count = values.tolist()
    return total / max(count, 1)


def _image_mean(image_sum: torch.Tensor, count: int, device: torch.device, world: int) -> torch.Tensor:
    if world > 1:
        image_sum = image_sum.to(device)
        counts = torch.tensor([count], dtype=torch.float64, device=device)
        dist.all_reduce(image_sum)
        dist.all_reduce(counts)
        count = int(counts.item())
    return (image_sum / max(count, 1)).cpu()
