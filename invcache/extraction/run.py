"""``invcache extract``: stream a split through frozen DETR into a sharded cache (SPEC §3, §6, §7).

DataLoader workers decode and resize (the CPU path), or threads read JPEG bytes that are
decoded and resized in batches on the model's device (the device path, ``--decode``;
``invcache.extraction.device_loader``); the forward runs under inference mode (and autocast
on GPU); rows are gathered into whole-shard buffers that a pool of writer threads
compresses and writes while the next batches run (``invcache.extraction.loop``). A shard is
marked complete only after all of its arrays are written, so rerunning the same command
after a crash skips complete shards, clears and rewrites the rest, and ends with the
arrays an uninterrupted run writes. Under ``torchrun`` rank r owns shards r, r+K, …;
rank 0 creates the arrays before any rank writes.

One writer per cache: the run (rank 0 under torchrun) holds the cache's writer lock
(``invcache.cache.lock``) from before it looks at the cache until it ends. ``--overwrite``
replaces only a cache (or a cache whose creation was cut short), never another folder, the
working directory, one of its ancestors, the home directory or the filesystem root.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import torch
import torch.distributed as dist

from invcache import __version__
from invcache.cache import schema as S
from invcache.cache.codec_choice import choose_uncompressed
from invcache.cache.lock import writer_lock
from invcache.cache.provenance import resume_differences
from invcache.cache.store import Cache
from invcache.data import open_split, preprocessing_record
from invcache.data.coco import CocoFolder
from invcache.data.device_decode import DeviceDecoder
from invcache.data.preprocess import check_size
from invcache.data.transforms import parse_transform, resolve_transforms
from invcache.data.wds import WdsSplit
from invcache.distributed import barrier, rank0_first, rank_and_world, resolve_device
from invcache.errors import InvcacheError, UsageError
from invcache.extraction.device_loader import device_batches
from invcache.extraction.loop import ExtractionTotals, forward_to_host, loader_batches, run_extraction
from invcache.forward import resolve_amp
from invcache.hashing import bytes_sha256
from invcache.models import build_detr, get_config
from invcache.settings import DECODE_CHOICES, ExtractSettings
from invcache.taps import INPUT

log = logging.getLogger(__name__)

# The disk estimate takes every tap at its raw size, each chunk with its crc32c: a lossless cache stores raw
# what Blosc shrinks by less than 1.08x and the encoder taps, the bulk, compress only about 1.10x, so
# assuming more (it once assumed 1.15x for every float tap) could let a run start that fills the disk.
CHUNK_CHECKSUM_BYTES = 4
# A shard's index: an (offset, length) pair of uint64 per chunk (one image), then its crc32c.
INDEX_BYTES_PER_CHUNK = 16
INDEX_CHECKSUM_BYTES = 4


@dataclass
class ExtractResult:
    cache: str
    images: int
    shards_written: int
    shards_skipped: int
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    raw_bytes: int = 0


def extract(
    settings: ExtractSettings,
    progress: Callable[[int, int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> ExtractResult:
    """Run (or resume) an extraction.

    ``on_plan(images)`` is told how many images this process will extract;
    ``progress(images, raw_bytes)`` is called after each batch. Under torchrun, call it
    inside :func:`invcache.distributed.process_group`.
    """
    _validate(settings)
    location = _cache_location(settings)
    if settings.overwrite:
        _refuse_to_replace(location)
    rank, world = rank_and_world()
    device = resolve_device(settings.device, rank)
    config = get_config(settings.model)
    taps = config.select_taps(settings.layers)
    # rank 0 first: a synthetic split is generated once, by one process
    dataset = rank0_first(lambda: _open_source(settings), lambda: _open_source(settings), rank, world)
    if settings.ids is not None:
        dataset.restrict(settings.ids)  # the dataset's rows stay the cache's rows
    # checked against the annotations before the model is built; webdataset shards name no category
    transforms = resolve_transforms(settings.transforms, dataset.coco if isinstance(dataset, CocoFolder) else None)
    dataset.transforms = transforms
    image_ids = dataset.image_ids[: settings.limit] if settings.limit else list(dataset.image_ids)
    if not image_ids:
        raise UsageError(f"no images in {settings.split}")
    # A shard never holds more images than the cache: its index has one entry per image it could hold.
    shard_size = min(settings.shard_size, len(image_ids))
    decoder = DeviceDecoder(settings.size, device) if _decode_on_device(settings, device) else None
    model = build_detr(settings.model, settings.weights, device=device)
    tap_shapes = {tap: config.tap_shape(tap, settings.size) for tap in taps}
    attributes = {
        "model": model.fingerprint,
        "preprocessing": preprocessing_record(settings.size),
        "perturbation": [t.record() for t in transforms] or None,
        "source": {**dataset.source_record(), "images": len(image_ids)},
        "taps": taps,
        "shard_size": shard_size,
        "codec": S.codec_record(settings.keepbits),
        "schema_version": S.SCHEMA_VERSION,
        "image_ids_sha256": bytes_sha256(np.asarray(image_ids, dtype=np.int64).tobytes()),
    }

    with ExitStack() as held, _naming_the_cache(location):
        def measure_codecs() -> list[str] | None:
            """The taps the first batch shows not worth compressing (SPEC §3; None if it holds no valid image)."""
            with torch.random.fork_rng(devices=[]):  # a DataLoader draws its seed from the caller's RNG
                first = next(loader_batches(dataset, list(range(min(settings.batch_size, len(image_ids)))),
                                            settings.batch_size, 0))
            valid = first["valid"].numpy().astype(bool)
            arrays = forward_to_host(model, first, taps, resolve_amp(settings.amp, device)).arrays()
            return choose_uncompressed({t: a[valid] for t, a in arrays.items()}) if valid.any() else None

        def create_or_resume() -> Cache:
            # Rank 0 takes the lock before it looks at the cache and holds it until the run ends; the
            # other ranks write only after rank 0 succeeded here, so they need no lock of their own.
            held.enter_context(writer_lock(location))
            return _create_or_resume(location, settings, attributes, tap_shapes, measure_codecs)

        cache = rank0_first(create_or_resume, lambda: Cache.open(location, mode="r+"), rank, world)

        complete = cache.complete_shards()
        owned_anywhere = not complete.all()  # the same answer on every rank: whether this run writes anything
        mine = [s for s in range(cache.num_shards) if s % world == rank]
        owned = [s for s in mine if not complete[s]]
        skipped = [s for s in mine if complete[s]]
        for shard in owned:
            cache.clear_shard(shard)
        if on_plan:
            on_plan(cache.rows_in(owned))

        started = time.perf_counter()
        rows = [r for s in owned for r in range(*cache.shard_bounds(s))]
        if decoder is not None:
            # threads read bytes (I/O, GIL released); at least one even where no DataLoader worker is asked for
            batches = device_batches(dataset, rows, settings.batch_size, decoder, max(1, settings.num_workers))
        else:
            batches = loader_batches(dataset, rows, settings.batch_size, settings.num_workers)
        with _cudnn_benchmark(settings.cudnn_benchmark):
            totals = run_extraction(
                cache, batches, image_ids, model, taps, resolve_amp(settings.amp, device), settings.writers, progress,
            ) if rows else ExtractionTotals()
        if decoder is not None and rows:
            counts = decoder.counts
            log.info(f"decoded {counts.device} image(s) on {device}, {sum(counts.cpu.values())} on the CPU path"
                     + "".join(f"; {n} {reason}" for reason, n in counts.cpu.most_common()))
        if INPUT in taps and not (cache.has_mean_image() and not owned_anywhere):
            _store_mean_image(cache, totals, skipped, rank, world, device)
        barrier(world)
        failures = cache.failures()
        if rank == 0:
            cache.group.attrs.update({
                "failures": failures,
                "complete": bool(cache.complete_shards().all()),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                # provenance only (not compared on resume): which decoder made this run's rows
                "decode": {"path": "device" if decoder is not None else "cpu", "device": str(device),
                           **(decoder.counts.record() if decoder is not None else {})},
                # the last run's settings (as given: --shard-size before clamping), so a report can
                # show the command that made the cache
                "settings": _jsonable(asdict(settings)),
            })
    return ExtractResult(
        location, len(image_ids), len(owned), len(skipped), failures, time.perf_counter() - started,
        totals.raw_bytes,
    )


def _store_mean_image(cache: Cache, totals: ExtractionTotals, skipped: list[int], rank: int, world: int,
                      device: torch.device) -> None:
    """The mean of ``input`` over valid rows, from the sums of the shards this run wrote and those done before."""
    total, count = cache.sum_valid_input(skipped)
    if totals.input_sum is not None:
        total, count = total + totals.input_sum, count + totals.input_count
    if world > 1:
        # int64 holds 255 × 2^55 images' worth of sums; the collective needs the group's device
        on = device if dist.get_backend() == "nccl" else torch.device("cpu")
        reduced = torch.from_numpy(np.append(total.astype(np.int64).ravel(), count)).to(on)
        dist.all_reduce(reduced)
        reduced = reduced.cpu().numpy()
        total, count = reduced[:-1].reshape(total.shape).astype(np.uint64), int(reduced[-1])
    if rank == 0 and cache.complete_shards().all() and count:
        cache.write_mean_image(total, count)


def _decode_on_device(settings: ExtractSettings, device: torch.device) -> bool:
    """``--decode``: ``device`` always, ``cpu`` never, ``auto`` on a CUDA device when no perturbation is set.

    Perturbations run on the original-size image on the host (SPEC §5): decoding it on the GPU
    would bring its pixels back across the bus, so ``auto`` keeps such runs on the CPU path.
    """
    if settings.decode == "auto":
        return device.type == "cuda" and not settings.transforms
    return settings.decode == "device"


@contextmanager
def _cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """cuDNN autotuning for this extraction only (it is process-wide state, so restore it)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _validate(settings: ExtractSettings) -> None:
    check_size(settings.size)
    if isinstance(settings.transforms, str):
        raise UsageError(f"transforms is a sequence of transforms, e.g. ({settings.transforms!r},)")
    for text in settings.transforms:
        parse_transform(text)  # the syntax, before any source is opened
    if settings.decode not in DECODE_CHOICES:
        raise UsageError(f"bad --decode {settings.decode!r}; choose one of: {', '.join(DECODE_CHOICES)}")
    if settings.decode == "device" and settings.transforms:
        raise UsageError("--decode device cannot apply --transform: perturbations run on the original-size image "
                         "on the host, which the device path never has; use --decode cpu (or auto)")
    if settings.shard_size < 1:
        raise UsageError("--shard-size must be at least 1")
    if settings.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if settings.limit is not None and settings.limit < 1:
        raise UsageError("--limit must be at least 1")
    if settings.keepbits is not None and not 1 <= settings.keepbits <= 10:
        raise UsageError("--keepbits must be between 1 and 10 (float16 has 10 mantissa bits)")


def _cache_location(settings: ExtractSettings) -> str:
    """``--out`` as a path or URL; a ``file://`` URL is the local path it names.

    zarr's fsspec store cannot create a group at a ``file://`` URL, and as a path the cache gets
    the writer lock, the checks of ``--overwrite`` and the disk estimate of any local cache.
    """
    location = settings.cache_location()
    url = urlsplit(location)
    if url.scheme != "file":
        return location
    if url.netloc not in ("", "localhost") or not url.path.startswith("/"):
        raise UsageError(f"bad --out {location!r}: a file URL names an absolute local path, file:///path/to/cache")
    return unquote(url.path)


def _refuse_to_replace(location: str) -> None:
    """``--overwrite`` deletes the folder at ``location``: refuse folders whose deletion is never meant."""
    if "://" in location:
        return
    path, cwd = Path(location).resolve(), Path.cwd().resolve()
    reasons = {  # the most specific reason last: it wins where two name one folder
        **{ancestor: "an ancestor of the current working directory" for ancestor in cwd.parents},
        cwd: "the current working directory",
        Path.home().resolve(): "the home directory",
        Path(path.anchor): "the filesystem root",
    }
    if path in reasons:
        raise UsageError(f"--overwrite would delete {location}, {reasons[path]}; it replaces only a cache folder "
                         "of its own: choose another --out")


def _open_source(settings: ExtractSettings):
    if settings.wds:
        return WdsSplit(settings.wds, settings.split, settings.size)
    return open_split(
        settings.source, settings.split, coco_root=settings.coco_root, workspace=settings.workspace,
        size=settings.size, synthetic_images=settings.synthetic_images,
    )


def _create_or_resume(location: str, settings: ExtractSettings, attributes: dict, tap_shapes: dict,
                      measure_codecs: Callable[[], list[str] | None]) -> Cache:
    """Resume the cache at ``location``, or create it; a lossless cache stores raw the taps ``measure_codecs``
    names (measured on the first batch, only when the cache is created)."""
    found = Cache.probe(location)
    if found == "foreign":
        # --overwrite included: it replaces a cache, never whatever else a mistyped --out names
        raise UsageError(f"{location} holds something that is not an invcache cache (a file, or a folder with "
                         "other content); it is left as it is: choose another --out")
    num_images, shard_size = attributes["source"]["images"], attributes["shard_size"]
    if found == "ready" and not settings.overwrite:
        cache = Cache.open(location, mode="r+")
        diffs = _resume_differences(cache.attrs, attributes)
        if diffs:
            # other images in the same place usually mean another cache, not a replacement
            other = "choose another --out for these images, or " if (
                cache.attrs.get("perturbation") != attributes["perturbation"]
                or cache.attrs.get("image_ids_sha256") != attributes["image_ids_sha256"]) else ""
            raise InvcacheError(
                f"the cache at {location} was made with other settings ({'; '.join(diffs)}); "
                f"{other}pass --overwrite to replace it"
            )
        _remove_partial_files(location)
        remaining = cache.rows_in(np.flatnonzero(~cache.complete_shards()))
        _check_disk(location, tap_shapes, remaining, shard_size, settings.force)
        return cache
    # Nothing there, a creation that was cut short, or --overwrite: start afresh.
    _check_disk(location, tap_shapes, num_images, shard_size, settings.force)
    if found != "absent" and "://" not in location:
        shutil.rmtree(location)
    cache = Cache.create(
        location, num_images=num_images, tap_shapes=tap_shapes, shard_size=shard_size,
        keepbits=settings.keepbits, uncompressed=measure_codecs() if settings.keepbits is None else None,
        attributes={**attributes, "state": "creating"},
    )
    cache.group.attrs.update({
        "state": "ready", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": _versions(),
    })
    return cache


def _resume_differences(existing: dict, new: dict) -> list[str]:
    """What differs between a cache's settings and this run's; perturbations named by their transforms.

    ``perturbation: none -> hue:red@stop sign`` says more than the records themselves.
    """
    diffs = resume_differences(existing, new)
    before, after = existing.get("perturbation"), new.get("perturbation")
    if before == after:
        return diffs
    return [d for d in diffs if not d.startswith("perturbation")] + [
        f"perturbation: {_transforms_text(before)} -> {_transforms_text(after)}"]


def _transforms_text(records: object) -> str:
    if not records:
        return "none"
    if not isinstance(records, list):
        return repr(records)
    return ", ".join(str(r.get("text")) if isinstance(r, dict) else repr(r) for r in records)


def _remove_partial_files(location: str) -> None:
    """Temporary files a killed local write left behind (zarr writes each file atomically via rename)."""
    if "://" in location:
        return
    for leftover in Path(location).rglob("*.partial"):
        leftover.unlink(missing_ok=True)


def estimate_bytes(tap_shapes: dict, images: int, shard_size: int) -> int:
    """Disk bytes of ``images`` images in shards of ``shard_size`` at most: the taps' data uncompressed, each chunk's
    crc32c and each shard's index.

    Images are consecutive rows, so they fill ceil(images / shard_size) shards (only the last is short).
    """
    per_image = sum(int(np.prod(shape)) * S.tap_dtype(tap).itemsize + CHUNK_CHECKSUM_BYTES
                    for tap, shape in tap_shapes.items())
    index = INDEX_BYTES_PER_CHUNK * shard_size + INDEX_CHECKSUM_BYTES
    return per_image * images + math.ceil(images / shard_size) * index * len(tap_shapes)


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest decimal unit that keeps the number at least 1 (B, kB, MB, GB, TB)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _check_disk(location: str, tap_shapes: dict, images: int, shard_size: int, force: bool) -> None:
    needed = estimate_bytes(tap_shapes, images, shard_size)
    message = f"disk estimate: {format_bytes(needed)} for {images} image(s)"
    if "://" in location:
        log.info(message)
        return
    probe = Path(location).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    log.info(f"{message}; {format_bytes(free)} free at {probe}")
    if needed > free and not force:
        raise InvcacheError(
            f"not enough disk at {probe}: need about {format_bytes(needed)}, {format_bytes(free)} free "
            "(pass --force to start anyway)"
        )


@contextmanager
def _naming_the_cache(location: str) -> Iterator[None]:
    """An OS error that names no file (a write on a full disk) names the cache and says how to go on.

    Shards already marked complete are whole, so rerunning the same command once the cause is
    fixed resumes from them.
    """
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, f"{exc.strerror or exc} while writing the cache; its complete shards are kept: "
                                 "rerun the same command to resume", location) from exc


def _jsonable(record: dict) -> dict:
    """Settings as JSON values: tuples as lists, paths as strings."""
    def value(v):
        if isinstance(v, tuple):
            return list(v)
        return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)

    return {k: value(v) for k, v in record.items()}


def _versions() -> dict:
    import numcodecs
    import torchvision
    import zarr

    return {
        "invcache": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "zarr": zarr.__version__, "numcodecs": numcodecs.__version__, "numpy": np.__version__,
        "python": sys.version.split()[0],
    }
