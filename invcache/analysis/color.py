"""``invcache analyze color``: the paper's colour case study, without its confound (SPEC §5).

For each category (paper: stop sign, bear, apple, bus), the evaluation images in which one of
its instances (not crowd) covers at least ``min_area`` of the image (:func:`select_images`; the
selection is written to ``selection-<category>.txt`` and every filter reads exactly those
images). For each of five HSV filters on the category's instance masks (hue set to red, green
or blue, or shifted by +120° / +240°) and the control ``hue:identity`` (the same uint8 → HSV →
uint8 round trip with the hue unchanged, so differences come from the hue alone), a cache of
the selected images beside the evaluation cache (made once, reused). Then, over every image
valid in all of a category's caches:

- **pairwise MSE** per stage between the reconstructions of each filtered image and of its
  control, and between the inputs themselves (the paper's figure: how much of the recolouring
  survives to each stage); also **restricted to the recoloured object's mask** (beyond the
  paper: colour drift of the object apart from changes elsewhere);
- **AP** of DETR per category per filter: COCOeval restricted to the selected images and that
  category;
- **colourfulness** (Hasler & Süsstrunk) and a saturation-weighted **hue histogram** of the
  object region per stage: whether reconstructions drift toward the category's prototypical
  colour;
- the example figure: rows = category × filter, columns = input and each stage's reconstruction.

Writes ``results.json``, ``per_image.csv``, ``hue_histograms.csv``, the selections, and
``pairwise_mse.png``, ``pairwise_mse_object.png``, ``ap.png``, ``hue.png``, ``examples.png``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from invcache.analysis.ap import cache_detections, evaluate_bbox, open_annotations
from invcache.analysis.common import evaluation_rows, mean_ci, open_evaluation_cache, provenance, write_results
from invcache.analysis.figures import curves, grouped_bars, image_grid
from invcache.analysis.perturbed import (
    HUE_BINS,
    aligned_rows,
    chain_taps,
    check_layers,
    colourfulness,
    hue_counts,
    masked_mse,
    perturbed_cache,
    reconstructions,
)
from invcache.analysis.stages import stage_modules
from invcache.chain import STAGES
from invcache.data.selection import ids_file_text, select_images
from invcache.data.transforms import category_ids, category_mask, parse_transform
from invcache.distributed import resolve_device
from invcache.errors import UsageError
from invcache.settings import COLOR_CATEGORIES, COLOR_MIN_AREA, AnalyzeSettings
from invcache.taps import INPUT

NAME = "color"
FILTERS = ("red", "green", "blue", "+120", "+240")
CONTROL = "identity"
ALL = "all"


def run(settings: AnalyzeSettings | None = None, *, categories: Sequence[str] = COLOR_CATEGORIES,
        min_area: float = COLOR_MIN_AREA, stages: Sequence[str] = STAGES, layers: Sequence[str] | None = None,
        annotations: str | os.PathLike | None = None) -> dict:
    """Recolour each category's objects with each filter and follow the change through the stages.

    ``layers``: the taps the perturbed caches hold [default: those the chains and AP read].
    ``annotations``: the COCO annotation file (masks and AP), where the cache records none.
    """
    settings = settings or AnalyzeSettings()
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise UsageError(f"unknown stage {unknown[0] if unknown else stages!r}; choose from: {', '.join(STAGES)}")
    categories = list(dict.fromkeys(categories))
    if not categories:
        raise UsageError("--categories names no category")
    cache = open_evaluation_cache(settings.cache_location())
    rows = evaluation_rows(cache)
    device = resolve_device(settings.device)
    modules = stage_modules(settings.modules_dir(), stages, cache, device)
    coco, annotation = open_annotations(cache, annotations)
    # every category and threshold is checked before the first extraction
    selections = {name: select_images(coco, name, min_area, image_ids=cache.image_ids[rows]) for name in categories}
    taps = check_layers(cache, layers, chain_taps(modules, stages))
    size = tuple(cache.attrs["preprocessing"]["size"])
    columns = (INPUT, *stages)
    variants = (CONTROL, *FILTERS)

    per_image, table, ap, histograms, examples, selection_files = {}, [], {}, {}, {}, {}
    for name, ids in selections.items():
        category_id = category_ids(coco)[name]
        transforms = {v: parse_transform(f"hue:{v}@{name}") for v in variants}
        # the selection is part of the name: another --min-area selects other images
        caches = {v: perturbed_cache(cache, [t.text], f"{t.slug}+area{min_area:g}", ids, taps, settings)
                  for v, t in transforms.items()}
        stage_modules(settings.modules_dir(), stages, caches[CONTROL], device)  # perturbed caches pair with them too
        selection_files[name] = f"selection-{transforms[CONTROL].slug.split('@', 1)[1]}.txt"
        selected = aligned_rows(*caches.values())
        image_ids = caches[CONTROL].image_ids[selected]
        masks = object_masks(coco, image_ids, category_id, size)
        counts = {(v, c): np.zeros(HUE_BINS) for v in variants for c in columns}
        streams = [reconstructions(caches[v], modules, stages, selected, settings.batch_size, device)
                   for v in variants]
        for parts in zip(*streams):
            batch_rows = parts[0][0]
            images = dict(zip(variants, (p[1] for p in parts)))
            mask = torch.stack([masks[int(i)] for i in caches[CONTROL].image_ids[batch_rows]]).to(device)
            for variant in variants:
                for column in columns:
                    counts[variant, column] += hue_counts(images[variant][column], mask)
                    key = (name, variant, column)
                    per_image.setdefault((*key, "object_colourfulness"), []).append(
                        colourfulness(images[variant][column], mask))
                    if variant != CONTROL:
                        per_image.setdefault((*key, "pairwise_mse"), []).append(
                            masked_mse(images[variant][column], images[CONTROL][column]))
                        per_image.setdefault((*key, "pairwise_mse_object"), []).append(
                            masked_mse(images[variant][column], images[CONTROL][column], mask))
            if name not in examples:
                examples[name] = {v: {c: images[v][c][:1].cpu() for c in columns} for v in variants}
        for key in [k for k in per_image if k[0] == name]:
            per_image[key] = np.concatenate(per_image[key])
        for k, image_id in enumerate(image_ids):
            for variant in variants:
                for column in columns:
                    row = {"category": name, "filter": variant, "image_id": int(image_id), "stage": column}
                    for metric in ("pairwise_mse", "pairwise_mse_object", "object_colourfulness"):
                        values = per_image.get((name, variant, column, metric))
                        row[metric] = float(values[k]) if values is not None else None
                    table.append(row)
        ap[name] = {}
        for variant in variants:
            evaluation = evaluate_bbox(coco, cache_detections(caches[variant], selected, settings.batch_size),
                                       image_ids, category_ids=[category_id])
            ap[name][variant] = {stat: evaluation["ap"][stat] for stat in ("AP", "AP50")}
        histograms[name] = {v: {c: _normalized(counts[v, c]) for c in columns} for v in variants}

    def summary(metric: str, variants_shown: Sequence[str]) -> dict:
        rows_out = {f"{name} · {v}": {c: mean_ci(per_image[name, v, c, metric]) for c in columns}
                    for name in selections for v in variants_shown}
        rows_out[ALL] = {c: mean_ci(np.concatenate([per_image[name, v, c, metric] for name in selections
                                                    for v in variants_shown])) for c in columns}
        return rows_out

    pairwise, pairwise_object = summary("pairwise_mse", FILTERS), summary("pairwise_mse_object", FILTERS)
    object_colour = summary("object_colourfulness", variants)
    results = {
        "analysis": NAME, "images": int(sum(len(ids) for ids in selections.values())), "stages": list(stages),
        "filters": list(FILTERS), "control": f"hue:{CONTROL}",
        "selection": {name: {"images": len(ids), "min_area": min_area, "file": selection_files[name]}
                      for name, ids in selections.items()},
        "pairwise_mse": pairwise, "pairwise_mse_object": pairwise_object, "object_colourfulness": object_colour,
        "ap": ap, "hue_histograms": histograms, "hue_bins": HUE_BINS, "annotations": annotation,
        "headline": {
            **{f"pairwise MSE, {c}": pairwise[ALL][c]["mean"] for c in columns},
            **{f"AP {name}, control → filters": _ap_change(ap[name]) for name in selections},
        },
        "settings": {"categories": list(categories), "min_area": min_area, "batch_size": settings.batch_size,
                     "layers": list(layers) if layers else None},
        "provenance": provenance(cache, modules),
    }
    hue_table = [{"category": name, "filter": v, "stage": c, "bin": b, "hue_degrees": b * 360 / HUE_BINS,
                  "weight": histograms[name][v][c][b]}
                 for name in selections for v in variants for c in columns for b in range(HUE_BINS)]
    figures = {
        "pairwise_mse": _pairwise_figure(pairwise, selections, columns, "whole image"),
        "pairwise_mse_object": _pairwise_figure(pairwise_object, selections, columns, "recoloured object only"),
        "ap": grouped_bars(list(selections), {v: [ap[n][v]["AP"] for n in selections] for v in variants},
                           title="DETR's AP per category under each filter (selected images, that category)",
                           ylabel="AP (IoU 0.50:0.95)"),
        "hue": _hue_figure(histograms, columns, variants),
        "examples": image_grid(
            {c: torch.cat([examples[n][v][c] for n in selections for v in variants]) for c in columns},
            [f"{n} · {v}" for n in selections for v in variants],
            title="Recoloured objects (rows) and their reconstructions from each stage (columns)"),
    }
    data = {selection_files[name]: ids_file_text(ids, f"analyze color: {name}, instance mask ≥ {min_area:g} of the "
                                                       f"image, from {annotation['file']}").encode()
            for name, ids in selections.items()}
    write_results(settings.out_dir(NAME), results, {"per_image": table, "hue_histograms": hue_table}, figures, data)
    return results


def object_masks(coco, image_ids: Sequence[int], category_id: int, size: tuple[int, int]) -> dict[int, torch.Tensor]:
    """The recoloured region of each image at the cache's size: the union of the category's instance masks,
    resized like the image (nearest neighbour, so a mask stays a mask)."""
    height, width = size
    masks = {}
    for image_id in image_ids:
        record = coco.imgs[int(image_id)]
        mask = category_mask(coco.imgToAnns.get(int(image_id), []), category_id, record["height"], record["width"])
        resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
        masks[int(image_id)] = torch.from_numpy(np.asarray(resized) > 127)
    return masks


def _normalized(counts: np.ndarray) -> list[float]:
    total = counts.sum()
    return (counts / total if total > 0 else counts).tolist()


def _ap_change(ap: dict) -> str:
    control = ap[CONTROL]["AP"]
    filtered = [ap[f]["AP"] for f in FILTERS if ap[f]["AP"] is not None]
    if control is None or not filtered:
        return "n/a"
    return f"{control:.3f} → {np.mean(filtered):.3f}"


def _pairwise_figure(summary: dict, selections: dict, columns: Sequence[str], region: str) -> Figure:
    series = {name: [float(np.mean([summary[f"{name} · {f}"][c]["mean"] for f in FILTERS])) for c in columns]
              for name in selections}
    series[ALL] = [summary[ALL][c]["mean"] for c in columns]
    return curves(list(columns), series, cis={ALL: [summary[ALL][c]["ci95"] for c in columns]},
                  title=f"Filtered vs control, average pairwise MSE ({region})", ylabel="MSE, [0, 1] pixels",
                  xlabel="stage (input, then reconstructions)")


def _hue_figure(histograms: dict, columns: Sequence[str], variants: Sequence[str]) -> Figure:
    """Rows = categories, columns = stages; in each panel the object's hue histogram under each filter."""
    names = list(histograms)
    figure = Figure(figsize=(2.1 * len(columns) + 1.2, 1.7 * len(names) + 0.8))
    axes = figure.subplots(len(names), len(columns), squeeze=False, sharex=True, sharey=True)
    degrees = np.arange(HUE_BINS) * 360 / HUE_BINS
    for r, name in enumerate(names):
        for c, column in enumerate(columns):
            ax = axes[r, c]
            for variant in variants:
                ax.plot(degrees, histograms[name][variant][column], label=variant,
                        linestyle="--" if variant == CONTROL else "-", linewidth=1)
            if r == 0:
                ax.set_title(column, fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            ax.set_xticks([0, 120, 240])
            ax.tick_params(labelsize=6)
    axes[0, -1].legend(fontsize=6, frameon=False, loc="upper right")
    figure.suptitle("Hue of the object region (saturation-weighted) per stage", fontsize=9)
    figure.supxlabel("hue, degrees", fontsize=8)
    return figure
