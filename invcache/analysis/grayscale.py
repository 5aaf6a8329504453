"""``invcache analyze grayscale``: does DETR put colour back into a gray image? (SPEC §5, the paper's colour finding)

The evaluation images again, converted to gray before DETR (``extract --transform grayscale``,
ITU-R 601 luma in three channels), in a cache beside the evaluation cache (made once, then
reused). For each stage, the reconstructions of the gray images next to those of the colour
images, over every image valid in both caches:

- Hasler & Süsstrunk's colourfulness of the inputs and of each stage's reconstructions, for
  colour and for gray inputs (a gray input scores exactly 0, so whatever its reconstructions
  score is colour the network put back: the paper's "colours re-emerge after the encoder" as
  a number per stage);
- the MSE of each reconstruction against its own input ([0, 1] pixels);
- DETR's box AP on the gray images against AP on the colour images (the cached heads, as
  ``analyze ap``).

Writes ``results.json``, ``per_image.csv``, ``colourfulness.png`` (curves over the stages),
``mse.png`` and ``grid.png`` (colour and gray input with each stage's reconstructions).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from invcache.analysis.ap import cache_detections, evaluate_bbox, open_annotations
from invcache.analysis.common import evaluation_rows, mean_ci, open_evaluation_cache, provenance, write_results
from invcache.analysis.figures import curves, image_grid
from invcache.analysis.perturbed import (
    aligned_rows,
    chain_taps,
    check_layers,
    colourfulness,
    masked_mse,
    perturbed_cache,
    reconstructions,
)
from invcache.analysis.stages import grid_rows, stage_modules
from invcache.chain import STAGES
from invcache.distributed import resolve_device
from invcache.errors import UsageError
from invcache.settings import AnalyzeSettings
from invcache.taps import INPUT

NAME = "grayscale"
TRANSFORM = "grayscale"
VARIANTS = ("color", "grayscale")


def run(settings: AnalyzeSettings | None = None, *, stages: Sequence[str] = STAGES, layers: Sequence[str] | None = None,
        annotations: str | os.PathLike | None = None) -> dict:
    """Compare reconstructions (and AP) of gray and colour inputs per stage; returns (and writes) the results.

    ``layers``: the taps the gray cache holds [default: those the chains and AP read].
    ``annotations``: the COCO annotation file for AP, where the cache records none (webdataset).
    """
    settings = settings or AnalyzeSettings()
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise UsageError(f"unknown stage {unknown[0] if unknown else stages!r}; choose from: {', '.join(STAGES)}")
    cache = open_evaluation_cache(settings.cache_location())
    evaluation_rows(cache)  # refuses a cache still being written or without valid images
    device = resolve_device(settings.device)
    modules = stage_modules(settings.modules_dir(), stages, cache, device)
    coco, annotation = open_annotations(cache, annotations)
    taps = check_layers(cache, layers, chain_taps(modules, stages))
    gray = perturbed_cache(cache, [TRANSFORM], TRANSFORM, cache.image_ids, taps, settings)
    stage_modules(settings.modules_dir(), stages, gray, device)  # the gray cache pairs with the modules too
    rows = aligned_rows(cache, gray)
    shown = grid_rows(cache, rows, None, settings.n)

    columns = (INPUT, *stages)
    per_image: dict[str, list[np.ndarray]] = {}
    grid: dict[str, list[torch.Tensor]] = {}
    for (batch_rows, color_images), (_, gray_images) in zip(
            reconstructions(cache, modules, stages, rows, settings.batch_size, device),
            reconstructions(gray, modules, stages, rows, settings.batch_size, device)):
        keep = torch.from_numpy(np.isin(batch_rows, shown))
        for variant, images in zip(VARIANTS, (color_images, gray_images)):
            for column in columns:
                per_image.setdefault(f"colourfulness_{variant}_{column}", []).append(colourfulness(images[column]))
                if column != INPUT:
                    per_image.setdefault(f"mse_{variant}_{column}", []).append(
                        masked_mse(images[column], images[INPUT]))
                if keep.any():
                    label = column if variant == "color" else f"{column} (gray)"
                    grid.setdefault(label, []).append(images[column][keep].cpu())
    values = {key: np.concatenate(parts) for key, parts in per_image.items()}
    image_ids = cache.image_ids[rows]

    ap = {variant: evaluate_bbox(coco, cache_detections(source, rows, settings.batch_size), image_ids)["ap"]
          for variant, source in zip(VARIANTS, (cache, gray))}
    colour = {f"{variant} input": {column: mean_ci(values[f"colourfulness_{variant}_{column}"]) for column in columns}
              for variant in VARIANTS}
    mse = {f"{variant} input": {stage: mean_ci(values[f"mse_{variant}_{stage}"]) for stage in stages}
           for variant in VARIANTS}
    results = {
        "analysis": NAME, "images": int(len(rows)), "stages": list(stages), "colourfulness": colour, "mse": mse,
        "ap": ap, "gray_cache": gray.location, "annotations": annotation,
        "headline": {
            **{f"colourfulness of gray-input reconstructions, {stage}": colour["grayscale input"][stage]["mean"]
               for stage in stages},
            "AP, colour input": ap["color"]["AP"], "AP, gray input": ap["grayscale"]["AP"],
        },
        "settings": {"batch_size": settings.batch_size, "n": settings.n, "layers": list(layers) if layers else None},
        "provenance": {**provenance(cache, modules), "gray_cache": provenance(gray)["cache"]},
    }
    table = [{"image_id": int(i), **{key: float(v[k]) for key, v in values.items()}} for k, i in enumerate(image_ids)]
    figures = {
        "colourfulness": curves(list(columns), {f"{v} input": [colour[f"{v} input"][c]["mean"] for c in columns]
                                                for v in VARIANTS},
                                cis={f"{v} input": [colour[f"{v} input"][c]["ci95"] for c in columns]
                                     for v in VARIANTS},
                                title=f"Colourfulness of inputs and reconstructions ({len(rows)} images, 95% CI)",
                                ylabel="colourfulness (Hasler & Süsstrunk)", xlabel="stage"),
        "mse": curves(list(stages), {f"{v} input": [mse[f"{v} input"][s]["mean"] for s in stages] for v in VARIANTS},
                      cis={f"{v} input": [mse[f"{v} input"][s]["ci95"] for s in stages] for v in VARIANTS},
                      title="Reconstruction error against the input it came from", ylabel="MSE, [0, 1] pixels",
                      xlabel="stage"),
        "grid": image_grid({name: torch.cat(parts) for name, parts in grid.items()},
                           [str(int(i)) for i in cache.image_ids[np.sort(shown)]],
                           title="Colour and gray inputs and their reconstructions"),
    }
    write_results(settings.out_dir(NAME), results, {"per_image": table}, figures)
    return results

