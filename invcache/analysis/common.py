"""What every analysis shares: the images it evaluates, batched whole-shard reads, the modules it
needs (with the command that makes a missing one), per-image errors with confidence intervals,
the provenance it records, and the atomic results writer.

An analysis evaluates **every valid image** of its cache (``evaluation_rows``), reading them in
batches that decode each shard once (``batches``); figures show only the first ``n``.
Its results go to ``<out>/``: CSVs and PNGs first, ``results.json`` last and atomically, so a
folder with ``results.json`` is a finished analysis and a rerun that fails leaves none.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from invcache.cache.store import Cache
from invcache.chain import LoadedModule, load_modules
from invcache.data.preprocess import IMAGENET_STD, unit_images
from invcache.errors import InvcacheError, UsageError
from invcache.hashing import file_sha256
from invcache.taps import DECODER_INPUT
from invcache.training.checkpoint import cache_fingerprint, check_compatible

RESULTS = "results.json"
# How each module is made when an analysis misses it (shown in the error).
TRAIN_COMMANDS = {
    "backbone-inv": "invcache train backbone-inv",
    "encoder-inv": "invcache train encoder-inv",
    "decoder-inv": "invcache train decoder-inv",
    "head-inv": "invcache train head-inv",
    "head-inv-scores": "invcache train head-inv --class-input scores",
}


def open_evaluation_cache(location: str) -> Cache:
    """The cache an analysis reads; a missing one is a usage error naming the command that makes it."""
    if not Cache.exists(location):
        path = Path(location)
        where = f"--root {path.parent.parent}" if path.parent.name == "cache" else f"--out {location}"
        raise UsageError(f"no cache at {location}; make it with `invcache extract --split {path.name} --layers all "
                         f"{where}` (or pass --cache)")
    return Cache.open(location)


def evaluation_rows(cache: Cache) -> np.ndarray:
    """Rows of every valid image, ascending; refuses a cache still being written or without a valid image."""
    complete = cache.complete_shards()
    if not complete.all():
        raise UsageError(f"{cache.location} is still being written ({int(complete.sum())} of {len(complete)} "
                         "shards complete); finish it by rerunning its `invcache extract` command")
    rows = np.flatnonzero(cache.valid)
    if not len(rows):
        raise UsageError(f"{cache.location} holds no valid image; nothing to analyze")
    return rows


def require_taps(cache: Cache, taps: Iterable[str], what: str) -> None:
    missing = [t for t in taps if t not in cache.taps and t != DECODER_INPUT]
    if missing:
        raise UsageError(f"{cache.location} lacks the taps {', '.join(missing)} that {what} needs; extract them "
                         "with `invcache extract --layers all`")


def batches(cache: Cache, taps: Sequence[str], rows: np.ndarray, batch_size: int,
            device: torch.device | str = "cpu") -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """(rows, {tap: tensor on ``device``}) for ascending ``rows``, ``batch_size`` at a time.

    Each shard is decoded once for all of its requested rows (whole-shard reads), and a batch
    may span shards.
    """
    pending_rows: list[np.ndarray] = []
    pending: dict[str, list[np.ndarray]] = {t: [] for t in taps}
    count = 0
    shard_of = rows // cache.shard_size
    for shard in np.unique(shard_of):
        in_shard = rows[shard_of == shard]
        start = int(shard) * cache.shard_size
        for tap in taps:
            pending[tap].append(cache.read_shard(tap, int(shard), complete=True)[in_shard - start])
        pending_rows.append(in_shard)
        count += len(in_shard)
        while count >= batch_size:
            yield _take(pending_rows, pending, batch_size, device)
            count -= batch_size
    if count:
        yield _take(pending_rows, pending, count, device)


def _take(pending_rows: list[np.ndarray], pending: dict[str, list[np.ndarray]], size: int,
          device: torch.device | str) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """Pop the first ``size`` rows of the pending blocks."""
    all_rows = np.concatenate(pending_rows)
    taken, rest = all_rows[:size], all_rows[size:]
    pending_rows[:] = [rest] if len(rest) else []
    out = {}
    for tap, blocks in pending.items():
        block = np.concatenate(blocks)
        out[tap] = torch.from_numpy(block[:size]).to(device)
        pending[tap] = [block[size:]] if len(rest) else []
    return taken, out


def require_modules(modules_dir: str | os.PathLike, names: Iterable[str], cache: Cache,
                    device: torch.device | str) -> dict[str, LoadedModule]:
    """The ``best`` checkpoint of each named module folder, refused (exit 2, naming why) when missing or foreign.

    Names are folder names under ``modules_dir``: ``head-inv-scores``, ``backbone-inv-from-enc.3``, ….
    """
    names = list(names)
    missing = [n for n in names if not (Path(modules_dir) / n / "best.json").is_file()]
    if missing:
        commands = "; ".join(f"`{train_command(n, modules_dir)}`" for n in missing)
        them = "it" if len(missing) == 1 else "them"
        raise UsageError(f"no trained {', '.join(missing)} in {modules_dir}; make {them} with {commands}")
    try:
        return load_modules(modules_dir, names, device=device, cache_attrs=cache.attrs,
                            cache_name=f"the cache {cache.location}")
    except InvcacheError as exc:
        raise UsageError(str(exc)) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a checkpoint's JSON or weights that do not parse
        raise UsageError(f"a module checkpoint in {modules_dir} cannot be read ({type(exc).__name__}: {exc}); "
                         "train it again") from None


def train_command(folder: str, modules_dir: str | os.PathLike | None = None) -> str:
    """The command that makes a module folder's checkpoint (``backbone-inv-from-enc.3`` → ``… --from enc.3``).

    With ``modules_dir``, where it goes: ``--root`` when that is a workspace's ``modules``, else ``--out``.
    """
    if folder in TRAIN_COMMANDS:
        command = TRAIN_COMMANDS[folder]
    else:
        name, _, tap = folder.partition("-from-")
        command = f"invcache train {name} --from {tap}"
    if modules_dir is None:
        return command
    modules_dir = Path(modules_dir)
    if modules_dir.name == "modules":
        return f"{command} --root {modules_dir.parent}"
    return f"{command} --out {modules_dir / folder}"


def image_errors(reconstruction: torch.Tensor, original: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image MSE of [0, 1] reconstructions (B, 3, H, W) against the originals.

    ``original``: the cached uint8 images (B, H, W, 3), or ``unit_images`` of them when one
    batch is compared with several reconstructions. ``normalized``: in the space DETR sees
    (ImageNet mean and std: the difference divided by each channel's std); ``pixel``: in [0, 1].
    """
    target = unit_images(original) if original.dtype == torch.uint8 else original
    squared = (reconstruction - target.to(reconstruction.device)) ** 2
    inverse_variance = torch.tensor(IMAGENET_STD, device=squared.device, dtype=squared.dtype).view(1, 3, 1, 1) ** -2
    pixel = squared.mean(dim=(1, 2, 3))
    normalized = (squared * inverse_variance).mean(dim=(1, 2, 3))
    return {"normalized": normalized.double().cpu().numpy(), "pixel": pixel.double().cpu().numpy()}


def mean_ci(values: Sequence[float] | np.ndarray) -> dict:
    """Mean over images with a 95% confidence interval (Student's t; images as independent samples)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    mean = float(values.mean()) if n else math.nan
    if n < 2:
        return {"mean": mean, "ci95": math.nan, "n": n}
    half = float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "ci95": half, "n": n}


def recorded_weights(cache: Cache) -> str:
    """The ``--weights`` value that builds the DETR ``cache`` was made with again: its recorded weights source, where
    a published file, recorded as ``official:<file>``, is ``official``."""
    weights = cache.attrs["model"]["weights"]
    return "official" if weights.startswith("official:") else weights


def provenance(cache: Cache, modules: Mapping[str, LoadedModule] | None = None) -> dict:
    """What an analysis read: the cache's model, preprocessing, perturbation, source and dates; each module's run."""
    attrs = cache.attrs
    record = {
        "cache": {
            "location": cache.location, "model": attrs.get("model"), "preprocessing": attrs.get("preprocessing"),
            "perturbation": attrs.get("perturbation"), "source": attrs.get("source"), "images": cache.num_images,
            "valid": int(cache.valid.sum()), "created": attrs.get("created"), "settings": attrs.get("settings"),
        },
    }
    if modules is not None:
        record["modules"] = {
            name: {"directory": str(m.directory), "spec": m.spec.to_dict(), "epoch": m.meta.get("epoch"),
                   "best_val_loss": m.meta.get("best_val_loss"), "train_cache": m.meta.get("train_cache"),
                   "cache_fingerprint": m.meta.get("cache"), "settings": m.meta.get("settings"),
                   "weights_sha256": file_sha256(m.directory / "best.safetensors")}
            for name, m in modules.items()
        }
    return record


def write_results(out: str | os.PathLike, results: dict, tables: Mapping[str, Sequence[Mapping]] | None = None,
                  figures: Mapping[str, object] | None = None, data: Mapping[str, bytes] | None = None) -> Path:
    """Write ``<out>/<table>.csv``, ``<out>/<figure>.png``, the raw ``data`` files, then ``<out>/results.json``.

    Each file is written atomically. The previous ``results.json`` and every file it listed
    are removed first, so a run that fails halfway never leaves a folder that looks finished
    and a rerun with other options leaves no stale figure behind. Figures are matplotlib
    ``Figure`` objects; NaN (an undefined figure, e.g. the CI of one image) is written as null.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _remove_previous(out)
    for name, rows in (tables or {}).items():
        text = io.StringIO()
        rows = list(rows)
        writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
        _atomic(out / f"{name}.csv", text.getvalue().encode())
    for name, figure in (figures or {}).items():
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        _atomic(out / f"{name}.png", buffer.getvalue())
    for name, payload in (data or {}).items():
        _atomic(out / name, payload)
    files = {"tables": [f"{n}.csv" for n in tables or {}], "figures": [f"{n}.png" for n in figures or {}],
             "data": list(data or {})}
    text = json.dumps(_without_nan({**results, "files": files}), indent=1, default=_jsonable, allow_nan=False)
    _atomic(out / RESULTS, text.encode())
    return out / RESULTS


def _remove_previous(out: Path) -> None:
    """Remove a previous run's results.json and the files it listed (only plain names inside ``out``)."""
    previous = out / RESULTS
    try:
        listed = json.loads(previous.read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        listed = {}
    previous.unlink(missing_ok=True)
    for names in listed.values() if isinstance(listed, dict) else []:
        for name in names if isinstance(names, list) else []:
            if isinstance(name, str) and name == Path(name).name and name not in ("", ".", ".."):
                (out / name).unlink(missing_ok=True)


def _without_nan(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.floating) and np.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nan(v) for v in value]
    if isinstance(value, np.ndarray):
        return _without_nan(value.tolist())
    return value


def _atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


def mean_training_image(modules: Mapping[str, LoadedModule], cache: Cache, mean_from: str | None = None
                        ) -> torch.Tensor:
    """The average-guessing baseline: the mean image of B⁻¹'s training cache (or ``mean_from``), (3, H, W) in [0, 1]."""
    location = mean_from or modules["backbone-inv"].meta["train_cache"]
    if not Cache.exists(location):
        raise UsageError(f"the mean training image comes from B⁻¹'s training cache {location}, which is not there "
                         "any more; pass the cache it was trained on (--mean-from)")
    source = Cache.open(location)
    try:
        check_compatible(cache_fingerprint(source.attrs), cache.attrs, f"the cache {location}",
                         f"the cache {cache.location}")
        mean_image = source.mean_image
    except InvcacheError as exc:
        raise UsageError(str(exc)) from None
    return torch.from_numpy(mean_image).permute(2, 0, 1).float()
