"""``invcache analyze stages``: how much of the image each stage's embedding still holds (SPEC §5).

Chains: backbone = B⁻¹(enc.0); encoder = B⁻¹(E⁻¹(enc.L)); decoder = B⁻¹(E⁻¹(D⁻¹(dec.L)));
head = B⁻¹(E⁻¹(D⁻¹(P⁻¹(head.logits, head.boxes)))). Over every valid image of the cache:
per-image MSE in normalized and in [0, 1] pixel space, mean ± 95% confidence interval, next
to the average-guessing baseline (the mean image of B⁻¹'s training cache). Writes
``results.json``, ``per_image.csv``, ``mse.png`` (bars) and ``grid.png`` (originals and
reconstructions of the first ``n`` images, or of ``ids``). ``settings.mean_from`` names
another cache for the baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from invcache.analysis.common import (
    batches,
    evaluation_rows,
    image_errors,
    mean_ci,
    mean_training_image,
    open_evaluation_cache,
    provenance,
    require_modules,
    require_taps,
    write_results,
)
from invcache.analysis.figures import bars_with_ci, image_grid
from invcache.cache.store import Cache
from invcache.chain import STAGE_CHAINS, STAGES, LoadedModule, invert
from invcache.data.preprocess import unit_images
from invcache.distributed import resolve_device
from invcache.errors import UsageError
from invcache.inverse import make_spec
from invcache.settings import AnalyzeSettings
from invcache.taps import INPUT

NAME = "stages"
SPACES = ("normalized", "pixel")


def run(settings: AnalyzeSettings | None = None, *, stages: Sequence[str] = STAGES, ids: Sequence[int] | None = None
        ) -> dict:
    """Reconstruct every valid image of the cache from each of ``stages``; returns (and writes) the results."""
    settings = settings or AnalyzeSettings()
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise UsageError(f"unknown stage {unknown[0] if unknown else stages!r}; choose from: {', '.join(STAGES)}")
    cache = open_evaluation_cache(settings.cache_location())
    rows = evaluation_rows(cache)
    device = resolve_device(settings.device)
    modules = stage_modules(settings.modules_dir(), stages, cache, device)
    inputs = {stage: modules[STAGE_CHAINS[stage][0]].spec.inputs for stage in stages}
    taps = sorted({INPUT, *(t for stage in stages for t in inputs[stage])})
    require_taps(cache, taps, "the stages analysis")
    baseline = mean_training_image(modules, cache, settings.mean_from).to(device)
    shown = grid_rows(cache, rows, ids, settings.n)

    labels = ["baseline", *stages]
    errors: dict[str, list[np.ndarray]] = {f"{label}_{space}": [] for label in labels for space in SPACES}
    image_ids, grid = [], {"original": [], **{stage: [] for stage in stages}}
    with torch.no_grad():
        for batch_rows, batch in batches(cache, taps, rows, settings.batch_size, device):
            original = unit_images(batch[INPUT])
            image_ids.append(cache.image_ids[batch_rows])
            reconstructions = {"baseline": baseline.expand(len(original), -1, -1, -1)}
            reconstructions.update({stage: invert(modules, {t: batch[t] for t in inputs[stage]},
                                                  via=STAGE_CHAINS[stage]) for stage in stages})
            for label, images in reconstructions.items():
                for space, values in image_errors(images, original).items():
                    errors[f"{label}_{space}"].append(values)
            keep = np.isin(batch_rows, shown)
            if keep.any():
                grid["original"].append(original[torch.from_numpy(keep)].cpu())
                for stage in stages:
                    grid[stage].append(reconstructions[stage][torch.from_numpy(keep)].cpu())

    per_image = {key: np.concatenate(values) for key, values in errors.items()}
    ids_all = np.concatenate(image_ids)
    summary = {label: {space: mean_ci(per_image[f"{label}_{space}"]) for space in SPACES} for label in labels}
    results = {
        "analysis": NAME, "images": int(len(rows)), "stages": list(stages), "mse": summary,
        "headline": {f"{label} MSE, [0,1] pixels": summary[label]["pixel"]["mean"] for label in labels},
        "settings": {"batch_size": settings.batch_size, "n": settings.n, "ids": list(ids) if ids else None,
                     "mean_from": settings.mean_from},
        "provenance": provenance(cache, modules),
    }
    table = [{"image_id": int(i), **{key: float(values[k]) for key, values in per_image.items()}}
             for k, i in enumerate(ids_all)]
    grid_columns = {name: torch.cat(parts) for name, parts in grid.items()}
    figures = {
        "mse": bars_with_ci(list(stages), [summary[s]["pixel"]["mean"] for s in stages],
                            [summary[s]["pixel"]["ci95"] for s in stages],
                            title=f"Reconstruction error per stage ({len(rows)} images, 95% CI)",
                            ylabel="MSE, [0, 1] pixels", baseline=summary["baseline"]["pixel"]["mean"]),
        "grid": image_grid(grid_columns, [str(int(i)) for i in cache.image_ids[np.sort(shown)]],
                           title="Originals and reconstructions from each stage"),
    }
    write_results(settings.out_dir(NAME), results, {"per_image": table}, figures)
    return results


def stage_modules(modules_dir, stages: Sequence[str], cache: Cache, device: torch.device) -> dict[str, LoadedModule]:
    """The modules the stages' chains need; each must read what its link of a chain reads."""
    names = sorted({name for stage in stages for name in STAGE_CHAINS[stage]})
    modules = require_modules(modules_dir, names, cache, device)
    for name, loaded in modules.items():
        expected = make_spec(name, cache.attrs)
        if loaded.spec.inputs != expected.inputs:
            raise UsageError(f"module {loaded.directory} reads {', '.join(loaded.spec.inputs)}, but the {name} link "
                             f"of a chain reads {', '.join(expected.inputs)}")
    return modules


def grid_rows(cache: Cache, rows: np.ndarray, ids: Sequence[int] | None, n: int) -> np.ndarray:
    """The rows the grids show: those of ``ids`` (each must be a valid image), else the first ``n`` valid rows."""
    if not ids:
        return rows[:n]
    row_of = {int(image_id): row for row, image_id in enumerate(cache.image_ids)}
    chosen = []
    for image_id in dict.fromkeys(ids):  # each image once, in the order given
        row = row_of.get(int(image_id))
        if row is None or row not in rows:
            raise UsageError(f"image id {image_id} is not a valid image of {cache.location}")
        chosen.append(row)
    return np.asarray(chosen)
