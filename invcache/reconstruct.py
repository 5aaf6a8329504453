"""Reconstruction chains (SPEC §5): from a stage's cached embedding back to pixels through the inverse modules.

backbone = B⁻¹(enc.0); encoder = B⁻¹(E⁻¹(enc.L)); decoder = B⁻¹(E⁻¹(D⁻¹(dec.L)));
head = B⁻¹(E⁻¹(D⁻¹(P⁻¹(head.logits, head.boxes)))). Each image's MSE is reported in
normalized and in [0, 1] pixel space, next to the average-guessing baseline (the mean
training image, which B⁻¹'s checkpoint carries).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from invcache import taps as T
from invcache.cache import schema as S
from invcache.cache.store import Cache
from invcache.data.preprocess import normalize_unit, unit_images
from invcache.distributed import resolve_device
from invcache.errors import InvcacheError, UsageError
from invcache.inverse import InverseSpec, make_spec, run_inverse
from invcache.train import checkpoint

STAGES = ("backbone", "encoder", "decoder", "head")
CHAINS = {
    "backbone": ("backbone-inv",),
    "encoder": ("encoder-inv", "backbone-inv"),
    "decoder": ("decoder-inv", "encoder-inv", "backbone-inv"),
    "head": ("head-inv", "decoder-inv", "encoder-inv", "backbone-inv"),
}


@dataclass
class LoadedModule:
    spec: InverseSpec
    module: torch.nn.Module
    extra: dict[str, torch.Tensor]


def parse_stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()] if text != "all" else list(STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise UsageError(f"unknown stage {unknown[0] if unknown else text!r}; choose from: {', '.join(STAGES)}, all")
    return stages


def load_chain_modules(modules_dir: str | os.PathLike, names: set[str], cache_attrs: dict, cache_location: str,
                       device: torch.device) -> dict[str, LoadedModule]:
    """The best checkpoint of each module, refused unless it was trained on caches like this one."""
    loaded = {}
    for name in sorted(names):
        directory = Path(modules_dir) / name
        module, meta, tensors = checkpoint.load(directory, "best")
        checkpoint.check_compatible(meta["cache"], cache_attrs, f"module {directory}", f"the cache {cache_location}")
        spec = InverseSpec(**meta["spec"])
        expected = make_spec(name, cache_attrs)
        if spec.inputs != expected.inputs:
            raise InvcacheError(f"module {directory} reads {spec.inputs}, but the {name} link of a chain reads "
                                f"{expected.inputs}")
        loaded[name] = LoadedModule(spec, module.to(device).eval(), {
            k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")})
    return loaded


@torch.no_grad()
def run_chain(stage: str, modules: dict[str, LoadedModule], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Images in [0, 1], (B, 3, H, W), reconstructed from the stage's cached embedding."""
    first, *rest = CHAINS[stage]
    x = run_inverse(modules[first].spec, modules[first].module, batch)
    for name in rest:
        x = modules[name].module(x)
    return x.float()


def _rows(cache: Cache, ids: list[int] | None, count: int) -> list[int]:
    valid = cache.array(S.VALID)[:]
    complete = np.repeat(cache.complete_shards(), cache.shard_size)[: cache.num_images]
    usable = valid & complete
    if ids is None:
        return np.flatnonzero(usable)[:count].tolist()
    image_ids = cache.array(S.IMAGE_ID)[:].tolist()
    rows = []
    for image_id in ids:
        if image_id not in image_ids:
            raise UsageError(f"image id {image_id} is not in {cache.location}")
        row = image_ids.index(image_id)
        if not usable[row]:
            raise UsageError(f"image id {image_id} is not a valid, extracted image of {cache.location}")
        rows.append(row)
    return rows


def reconstruct(
    cache_location: str,
    modules_dir: str | os.PathLike,
    out: str | os.PathLike,
    stages: list[str] = list(STAGES),
    ids: list[int] | None = None,
    count: int = 8,
    device: str | None = None,
) -> dict:
    """Run the chains of ``stages`` on some images of a cache; write ``grid.png``, ``metrics.json`` and ``.csv``."""
    cache = Cache.open(cache_location)
    attrs = cache.attrs
    names = {name for stage in stages for name in CHAINS[stage]}
    modules = load_chain_modules(modules_dir, names, attrs, cache_location, resolve_device(device))
    taps = sorted({T.INPUT, *(t for stage in stages for t in modules[CHAINS[stage][0]].spec.inputs)})
    missing = [t for t in taps if t not in cache.taps and t != T.DECODER_INPUT]
    if missing:
        raise UsageError(f"{cache_location} lacks the taps {', '.join(missing)}")
    rows = _rows(cache, ids, count)
    if not rows:
        raise UsageError(f"no valid images to reconstruct in {cache_location}")
    on = resolve_device(device)
    batch = {t: torch.from_numpy(np.stack([cache.read(t, r, r + 1)[0] for r in rows])).to(on) for t in taps}
    original = unit_images(batch[T.INPUT])
    mean_image = modules["backbone-inv"].extra.get("mean_image")
    if mean_image is None:
        raise InvcacheError(f"{Path(modules_dir) / 'backbone-inv'} carries no mean training image")
    baseline = mean_image.to(batch[T.INPUT].device).unsqueeze(0).expand_as(original)

    reconstructions = {stage: run_chain(stage, modules, batch) for stage in stages}
    image_ids = [int(cache.read(S.IMAGE_ID, r, r + 1)[0]) for r in rows]
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
