"""Reconstruction chains (SPEC §5): from a stage's cached embedding back to pixels through the inverse modules.

backbone = B⁻¹(enc.0); encoder = B⁻¹(E⁻¹(enc.L)); decoder = B⁻¹(E⁻¹(D⁻¹(dec.L)));
head = B⁻¹(E⁻¹(D⁻¹(P⁻¹(head.logits, head.boxes)))). Each image's MSE is reported in
normalized and in [0, 1] pixel space, next to the average-guessing baseline (the mean
image of B⁻¹'s training cache, a statistic the cache stores).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from invcache import taps as T
from invcache.cache.store import Cache
from invcache.chain import STAGE_CHAINS, STAGES, LoadedModule, invert, load_modules
from invcache.data.preprocess import normalize_unit, unit_images
from invcache.distributed import resolve_device
from invcache.errors import InvcacheError, UsageError
from invcache.inverse import make_spec
from invcache.training import checkpoint


def parse_stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()] if text != "all" else list(STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise UsageError(f"unknown stage {unknown[0] if unknown else text!r}; choose from: {', '.join(STAGES)}, all")
    return stages


def stage_modules(modules_dir: str | os.PathLike, stages: list[str], cache: Cache,
                  device: torch.device) -> dict[str, LoadedModule]:
    """The modules the stages' chains need, refused unless trained on caches like this one and on the stage's taps."""
    names = {name for stage in stages for name in STAGE_CHAINS[stage]}
    modules = load_modules(modules_dir, names, device=device, cache_attrs=cache.attrs,
                           cache_name=f"the cache {cache.location}")
    for name, loaded in modules.items():
        expected = make_spec(name, cache.attrs)
        if loaded.spec.inputs != expected.inputs:
            raise InvcacheError(f"module {loaded.directory} reads {loaded.spec.inputs}, but the {name} link of a "
                                f"chain reads {expected.inputs}")
    return modules


def mean_training_image(modules: dict[str, LoadedModule], cache: Cache, mean_from: str | None = None) -> torch.Tensor:
    """The average-guessing baseline: the mean image of B⁻¹'s training cache (or ``mean_from``), (3, H, W) in [0, 1]."""
    backbone = modules["backbone-inv"]
    location = mean_from or backbone.meta["train_cache"]
    if not Cache.exists(location):
        raise InvcacheError(f"the mean training image comes from B⁻¹'s training cache {location}, which is not "
                            "there any more; pass the cache it was trained on as mean_from")
    source = Cache.open(location)
    checkpoint.check_compatible(checkpoint.cache_fingerprint(source.attrs), cache.attrs, f"the cache {location}",
                                f"the cache {cache.location}")
    return torch.from_numpy(source.mean_image).permute(2, 0, 1).float()


def _rows(cache: Cache, ids: list[int] | None, count: int) -> list[int]:
    complete = np.repeat(cache.complete_shards(), cache.shard_size)[: cache.num_images]
    usable = cache.valid & complete
    if ids is None:
        return np.flatnonzero(usable)[:count].tolist()
    row_of = {int(image_id): row for row, image_id in enumerate(cache.image_ids)}
    rows = []
    for image_id in ids:
        if image_id not in row_of:
            raise UsageError(f"image id {image_id} is not in {cache.location}")
        if not usable[row_of[image_id]]:
            raise UsageError(f"image id {image_id} is not a valid, extracted image of {cache.location}")
        rows.append(row_of[image_id])
    return rows


def reconstruct(
    cache_location: str,
    modules_dir: str | os.PathLike,
    out: str | os.PathLike,
    stages: list[str] = list(STAGES),
    ids: list[int] | None = None,
    count: int = 8,
    device: str | None = None,
    mean_from: str | None = None,
) -> dict:
    """Run the chains of ``stages`` on some images of a cache; write ``grid.png``, ``metrics.json`` and ``.csv``."""
    cache = Cache.open(cache_location)
    on = resolve_device(device)
    modules = stage_modules(modules_dir, stages, cache, on)
    inputs = {stage: modules[STAGE_CHAINS[stage][0]].spec.inputs for stage in stages}
    taps = sorted({T.INPUT, *(t for stage in stages for t in inputs[stage])})
    missing = [t for t in taps if t not in cache.taps and t != T.DECODER_INPUT]
    if missing:
        raise UsageError(f"{cache_location} lacks the taps {', '.join(missing)}")
    rows = _rows(cache, ids, count)
    if not rows:
        raise UsageError(f"no valid images to reconstruct in {cache_location}")
    batch = {t: cache[t].torch[rows].to(on) for t in taps}
    original = unit_images(batch[T.INPUT])
    baseline = mean_training_image(modules, cache, mean_from).to(on).unsqueeze(0).expand_as(original)

    reconstructions = {stage: invert(modules, {t: batch[t] for t in inputs[stage]}, via=STAGE_CHAINS[stage])
                       for stage in stages}
    image_ids = cache.image_ids[rows].tolist()
    per_image = []
    for i, image_id in enumerate(image_ids):
        entry = {"image_id": image_id}
        for label, images in [("baseline", baseline), *reconstructions.items()]:
            entry[f"{label}_mse_normalized"] = _mse(normalize_unit(images[i]), normalize_unit(original[i]))
            entry[f"{label}_mse_pixel"] = _mse(images[i], original[i])
        per_image.append(entry)
    labels = ["baseline", *stages]
    summary = {
        f"{label}_mse_{space}": float(np.mean([e[f"{label}_mse_{space}"] for e in per_image]))
        for label in labels for space in ("normalized", "pixel")
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _grid(original, reconstructions, image_ids).save(out / "grid.png")
    results = {"cache": cache_location, "modules": str(modules_dir), "stages": stages, "mean": summary,
               "images": per_image}
    (out / "metrics.json").write_text(json.dumps(results, indent=1))
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(per_image[0]))
        writer.writeheader()
        writer.writerows(per_image)
    return results


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


def _to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))


def _grid(original: torch.Tensor, reconstructions: dict[str, torch.Tensor], image_ids: list[int]) -> Image.Image:
    """Rows: images; columns: original, then one reconstruction per stage; a header names the columns."""
    height, width = original.shape[2:]
    columns = ["original", *reconstructions]
    header = 16
    canvas = Image.new("RGB", (width * len(columns), header + height * len(image_ids)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(columns):
        draw.text((c * width + 4, 2), label, fill="black")
    for r in range(len(image_ids)):
        tiles = [original[r], *(images[r] for images in reconstructions.values())]
        for c, tile in enumerate(tiles):
            canvas.paste(_to_pil(tile), (c * width, header + r * height))
    return canvas
