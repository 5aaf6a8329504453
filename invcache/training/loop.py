"""``invcache train NAME``: fit one inverse module from the cache alone — DETR is never built.

Read top to bottom: :func:`prepare` checks the caches and builds (or restores) the module,
its optimizer and its history; :func:`train_step` is one optimizer step (also what the
training-speed benchmark times); :func:`train_epoch` runs one epoch of steps; :func:`evaluate`
is the validation pass; :func:`save_epoch` writes the checkpoints and the metrics line;
:func:`train` strings them together.

Adam at the module's learning rate; one validation pass per epoch on the validation cache
(the training loss stands in without one); ``last`` is saved every epoch (weights,
optimizer, epoch), ``best`` whenever the validation loss improves; one JSON line per epoch
in ``metrics.jsonl``. Losses are summed on the device and read back only every
``log_every`` steps and at the end of an epoch. Batches come from
:class:`invcache.cache.batches.CacheBatches` (whole shards decoded in ``decode_threads``
threads, gathered into preallocated buffers, pinned on CUDA; no DataLoader workers). Data order
depends only on (seed, epoch) and the settings of :data:`_ORDER_SETTINGS`, so a run resumed from
``last`` continues exactly as the uninterrupted run would; a resume that changes one of those is
refused. Under ``torchrun`` (inside :func:`invcache.distributed.process_group`) the module is
wrapped in DistributedDataParallel and every rank reads its share of the cache.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from invcache import taps as T
from invcache.cache.batches import CacheBatches
from invcache.cache.store import Cache
from invcache.distributed import barrier, rank_and_world, resolve_device
from invcache.errors import InvcacheError, UsageError
from invcache.forward import resolve_amp
from invcache.inverse import LEARNING_RATES, InverseSpec, build_inverse, inverse_loss, make_spec, run_inverse
from invcache.settings import TrainSettings
from invcache.training import checkpoint
from invcache.workspace import TRAIN_SPLIT, VAL_SPLIT, Workspace

log = logging.getLogger(__name__)


@dataclass
class TrainProgress:
    """One report to ``train(progress=...)``: during an epoch every ``log_every`` steps, and once at its end."""

    epoch: int  # 1-based, the epoch in progress
    epochs: int  # the run's total
    step: int  # steps done in this epoch
    steps: int  # steps in this epoch
    samples_per_s: float
    train_loss: float | None  # running mean over this epoch so far
    val_loss: float | None = None  # only on the report that ends an epoch
    epoch_done: bool = False

    def summary(self) -> str:
        """The line the command prints for the report that ends an epoch."""
        return (f"epoch {self.epoch}/{self.epochs}: train loss {_number(self.train_loss)}, "
                f"validation loss {_number(self.val_loss)}")


@dataclass
class TrainResult:
    out: Path
    epochs: int
    steps: int
    best_val_loss: float
    history: list[dict]
    module: torch.nn.Module


@dataclass
class TrainRun:
    """Everything :func:`prepare` resolves: caches, module, optimizer, and where the run stands."""

    settings: TrainSettings
    spec: InverseSpec
    location: str
    val_location: str | None
    fingerprint: dict
    device: torch.device
    amp: torch.dtype | None
    rank: int
    world: int
    out: Path
    lr: float
    module: torch.nn.Module
    trainee: torch.nn.Module  # the module, wrapped in DDP under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    start_epoch: int = 0
    step: int = 0
    best: float = math.inf
    history: list[dict] = field(default_factory=list)
    batches: CacheBatches | None = None  # the training reader, built at the first epoch and kept for its buffers

    @property
    def taps(self) -> list[str]:
        return [*self.spec.inputs, self.spec.target]


def train(settings: TrainSettings, progress: Callable[[TrainProgress], None] | None = None) -> TrainResult:
    """Train (or resume) one module; under torchrun call it inside :func:`invcache.distributed.process_group`."""
    run = prepare(settings)
    for epoch in range(run.start_epoch, settings.epochs):
        started = time.perf_counter()
        train_loss = train_epoch(run, epoch, progress)
        val_loss = evaluate(run.spec, run.module, run.val_location, settings, run.device, run.amp, run.rank,
                            run.world) if run.val_location else train_loss
        record = {"epoch": epoch + 1, "step": run.step, "train_loss": train_loss, "val_loss": val_loss,
                  "lr": run.lr, "seconds": round(time.perf_counter() - started, 3)}
        save_epoch(run, record)
        if progress:
            progress(TrainProgress(epoch + 1, settings.epochs, 0, 0, 0.0, train_loss, val_loss, epoch_done=True))
    return TrainResult(run.out, settings.epochs, run.step, run.best, run.history, run.module)


def prepare(settings: TrainSettings) -> TrainRun:
    """Check the caches, build the module and its optimizer, and restore ``last`` when resuming."""
    if settings.epochs < 1 or settings.batch_size < 1:
        raise UsageError("--epochs and --batch-size must be at least 1")
    if settings.decode_threads < 1 or settings.shuffle_window < 1:
        raise UsageError("--decode-threads and shuffle_window must be at least 1")
    if settings.num_workers is not None:
        warnings.warn(NUM_WORKERS_DEPRECATED, FutureWarning, stacklevel=3)
    rank, world = rank_and_world()
    device = resolve_device(settings.device, rank)
    location = settings.cache or str(Workspace.at(settings.workspace).cache(TRAIN_SPLIT))
    if not Cache.exists(location):
        if settings.cache:
            raise UsageError(f"no cache at {location} (--cache)")
        raise UsageError(f"no cache at {location}; run `invcache extract --split {TRAIN_SPLIT} --layers all` first "
                         "(or pass --cache)")
    attrs = Cache.open(location).attrs
    spec = make_spec(settings.name, attrs, from_tap=settings.from_tap, width=settings.width,
                     class_input=settings.class_input)
    _check_taps(Cache.open(location), spec, f"the training cache {location}")
    complete = Cache.open(location).complete_shards()
    if not complete.any():
        raise UsageError(f"{location} has no complete shard yet; finish its extraction first")
    if not CacheBatches(location, [spec.target], settings.batch_size, shuffle=False).total:
        raise UsageError(f"{location} has no valid image in its complete shards; nothing to train on")
    if not complete.all():
        log.warning(f"{location} is partly extracted ({int(complete.sum())} of {len(complete)} shards); "
                    "training on the complete ones")
    fingerprint = checkpoint.cache_fingerprint(attrs)
    val_location = _validation_cache(settings)
    if val_location:
        val_cache = Cache.open(val_location)
        checkpoint.check_compatible(fingerprint, val_cache.attrs, f"the training cache {location}",
                                    f"the validation cache {val_location}")
        _check_taps(val_cache, spec, f"the validation cache {val_location}")

    out = Path(settings.out_dir())
    if rank == 0:  # the one rank that writes
        _check_writable(out, "--out" if settings.out else "the run folder")

    lr = settings.lr or LEARNING_RATES[spec.name]
    with torch.random.fork_rng(devices=[]):  # the seed picks the initial weights without touching the caller's RNG
        torch.manual_seed(settings.seed)
        module = build_inverse(spec).to(device)
    amp = resolve_amp(settings.amp, device)
    run = TrainRun(
        settings, spec, location, val_location, fingerprint, device, amp, rank, world, out, lr,
        module, module, torch.optim.Adam(module.parameters(), lr=lr),
        torch.amp.GradScaler(device.type, enabled=amp == torch.float16),
    )
    if (run.out / "last.json").exists():
        if not settings.resume:
            raise InvcacheError(f"{run.out} already holds a training run; pass --resume to continue it or --out "
                                "elsewhere")
        _restore(run, attrs)
    if world > 1:
        run.trainee = torch.nn.parallel.DistributedDataParallel(module)
    return run


def train_step(spec: InverseSpec, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, batch: dict[str, torch.Tensor], amp: torch.dtype | None) -> torch.Tensor:
    """One optimizer step on a batch already on the device; returns the loss, detached, still on the device."""
    device_type = next(iter(batch.values())).device.type
    with torch.autocast(device_type, dtype=amp, enabled=amp is not None):
        prediction = run_inverse(spec, model, batch)
    loss = inverse_loss(spec, prediction, batch)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def train_epoch(run: TrainRun, epoch: int, progress: Callable[[TrainProgress], None] | None = None) -> float:
    """One epoch of steps over this rank's share of the training cache; returns the mean loss across ranks."""
    settings = run.settings
    # No drop_last: every rank holds the same number of rows (equal shares), so the ranks take the
    # same number of steps with their partial last batch too, and no row is skipped.
    if run.batches is None:  # one reader for the run: its shard and batch buffers are reused from epoch to epoch
        run.batches = CacheBatches(run.location, run.taps, settings.batch_size, seed=settings.seed,
                                   shuffle_window=settings.shuffle_window, rank=run.rank, world=run.world,
                                   decode_threads=settings.decode_threads, device=run.device)
    batches = run.batches
    batches.set_epoch(epoch)
    steps = len(batches)
    run.trainee.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    seen, started = 0, time.perf_counter()
    for done, batch in enumerate(batches, start=1):
        # the reader's buffers, refilled once the next batch is asked for (after these copies, on CUDA)
        batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items() if k in run.taps}
        loss = train_step(run.spec, run.trainee, run.optimizer, run.scaler, batch, run.amp)
        size = len(batch[run.spec.target])
        loss_sum += loss.double() * size
        seen += size
        run.step += 1
        if progress and (done % settings.log_every == 0 or done == steps):
            progress(TrainProgress(epoch + 1, settings.epochs, done, steps, seen / (time.perf_counter() - started),
                                   loss_sum.item() / seen))
    return _mean_across_ranks(loss_sum, seen, run.device, run.world)


@torch.no_grad()
def evaluate(spec: InverseSpec, module: torch.nn.Module, location: str, settings: TrainSettings,
             device: torch.device, amp: torch.dtype | None, rank: int = 0, world: int = 1) -> float:
    """Mean loss per image over every valid image of a cache (each rank takes its share, no padding)."""
    batches = CacheBatches(location, [*spec.inputs, spec.target], settings.batch_size, shuffle=False, rank=rank,
                           world=world, equal_shares=False, decode_threads=settings.decode_threads, device=device)
    was_training = module.training
    module.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in spec.inputs or k == spec.target}
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            prediction = run_inverse(spec, module, batch)
        total += inverse_loss(spec, prediction, batch).double() * len(prediction)
        count += len(prediction)
    module.train(was_training)
    return _mean_across_ranks(total, count, device, world)


def save_epoch(run: TrainRun, record: dict) -> None:
    """Append the epoch to the history; rank 0 writes ``last`` (and ``best`` if improved) and ``metrics.jsonl``."""
    run.history.append(record)
    improved = record["val_loss"] < run.best
    run.best = min(run.best, record["val_loss"])
    if run.rank == 0:
        meta = {
            "spec": run.spec.to_dict(), "cache": run.fingerprint, "train_cache": run.location,
            "val_cache": run.val_location, "settings": {**_jsonable(asdict(run.settings)), "lr": run.lr,
                                                         "world_size": run.world},
            "epoch": record["epoch"], "step": run.step, "best_val_loss": run.best, "history": run.history,
            "grad_scaler": run.scaler.state_dict(),
        }
        if improved:
            checkpoint.save(run.out, "best", run.module, meta)
        checkpoint.save(run.out, "last", run.module, meta, optimizer=run.optimizer)
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    barrier(run.world)


def _validation_cache(settings: TrainSettings) -> str | None:
    """``--val-cache``, else the workspace's validation split when training on the workspace's training split."""
    if settings.val_cache:
        if not Cache.exists(settings.val_cache):
            raise UsageError(f"no cache at {settings.val_cache} (--val-cache)")
        return settings.val_cache
    default = Workspace.at(settings.workspace).cache(VAL_SPLIT)
    return str(default) if settings.cache is None and Cache.exists(default) else None


def _check_taps(cache: Cache, spec: InverseSpec, what: str) -> None:
    missing = [t for t in [*spec.inputs, spec.target] if t not in {*cache.taps, T.DECODER_INPUT}]
    if missing:
        raise UsageError(f"{what} lacks the taps {', '.join(missing)} that {spec.name} needs; extract them with "
                         "--layers")


def _check_writable(out: Path, what: str) -> None:
    """Create ``out`` and write and remove a file in it, so an unwritable folder is refused before any training."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"cannot write to {what} {out}: it is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-probe-") as probe:
            probe.write(b"probe")
            probe.flush()
    except OSError as exc:
        raise UsageError(f"cannot write to {what} {out}: {exc.strerror or exc}") from None


def _restore(run: TrainRun, attrs: dict) -> None:
    saved, meta, tensors = checkpoint.load(run.out, "last")
    where = run.out / "last.json"
    if meta["spec"] != run.spec.to_dict():
        raise InvcacheError(f"{run.out} holds {meta['spec']}, not {run.spec.to_dict()}; choose another --out")
    checkpoint.check_compatible(meta["cache"], attrs, f"the run in {run.out}", f"the cache {run.location}")
    problem = _resume_state_problem(meta)
    if problem:
        raise InvcacheError(f"{where}: {problem}; it is not a checkpoint as invcache writes it")
    # The order only matters for epochs still to run: a finished run resumes (to nothing) whatever read it.
    changed = _order_differences(meta["settings"], run) if meta["epoch"] < run.settings.epochs else []
    if changed:
        raise InvcacheError(f"cannot resume the run in {run.out} with settings that change the order or batching of "
                            f"its data ({'; '.join(changed)}); resume with the run's values, or train anew with --out "
                            "elsewhere")
    run.module.load_state_dict(saved.state_dict())
    checkpoint.load_optimizer_state(run.optimizer, meta, tensors, where)
    run.start_epoch, run.step, run.best, run.history = meta["epoch"], meta["step"], meta["best_val_loss"], \
        meta["history"]
    if meta["grad_scaler"]:
        try:
            run.scaler.load_state_dict(meta["grad_scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise InvcacheError(f"{where}: its grad_scaler state cannot be restored ({exc!r})") from None


# What an epoch's batches depend on besides (seed, epoch), with their flags (CacheBatches): the
# shuffle window decides which rows can meet in a batch, the batch size and the number of ranks
# how the epoch's sequence is cut. Decode threads change only the speed. A run saved before
# CacheBatches (it records no shuffle_window) read its data in another order, so it cannot be
# continued exactly either.
_ORDER_SETTINGS = {"seed": "--seed", "batch_size": "--batch-size", "shuffle_window": "shuffle_window",
                   "world_size": "the number of torchrun processes"}
NUM_WORKERS_DEPRECATED = ("num_workers (--num-workers) is deprecated and ignored: training reads batches in "
                          "decode_threads (--decode-threads) threads, without DataLoader worker processes")


def _order_differences(saved: dict, run: TrainRun) -> list[str]:
    """``--batch-size 64 -> 128`` for each setting of ``run`` that would continue the saved run in another order."""
    if "shuffle_window" not in saved:
        return ["the run was saved by the per-sample reader of earlier versions, whose order this one does not "
                "reproduce"]
    current = {**asdict(run.settings), "world_size": run.world}
    return [f"{flag} {saved.get(key)!r} -> {current[key]!r}" for key, flag in _ORDER_SETTINGS.items()
            if saved.get(key) != current[key]]


def _resume_state_problem(meta: dict) -> str | None:
    """Why ``meta`` lacks what a resume reads besides the spec, the fingerprint and the optimizer, if it does."""
    checks = [
        ("epoch", _is_int_from(meta.get("epoch"), 1), "a positive integer"),
        ("step", _is_int_from(meta.get("step"), 0), "a non-negative integer"),
        ("best_val_loss", isinstance(meta.get("best_val_loss"), (int, float))
         and not isinstance(meta.get("best_val_loss"), bool), "a number"),
        ("history", isinstance(meta.get("history"), list)
         and all(isinstance(h, dict) for h in meta.get("history")), "a list of objects"),
        ("settings", isinstance(meta.get("settings"), dict), "an object"),
        ("grad_scaler", isinstance(meta.get("grad_scaler"), dict), "an object"),
    ]
    for key, ok, expected in checks:
        if not ok:
            return f"{key} is {meta.get(key)!r}, not {expected}" if key in meta else f"it has no {key}"
    return None


def _is_int_from(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _mean_across_ranks(total: torch.Tensor, count: int, device: torch.device, world: int) -> float:
    values = torch.stack([total.to(device, torch.float64), torch.tensor(float(count), device=device,
                                                                           dtype=torch.float64)])
    if world > 1:
        dist.all_reduce(values)
    total_value, count_value = values.tolist()
    return total_value / count_value if count_value else math.nan


def _number(value: float | None) -> str:
    return f"{value:.5f}" if value is not None else "n/a"


def _jsonable(settings: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}
