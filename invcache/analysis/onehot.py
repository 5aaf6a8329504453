"""``invcache analyze onehot``: what the one-hot class input of P⁻¹ costs the head-stage reconstruction (SPEC §5).

The paper's P⁻¹ sees only the argmax of DETR's class logits (one-hot); here the same chain
with a P⁻¹ fed the full softmax scores is set next to it:
one-hot = B⁻¹(E⁻¹(D⁻¹(P⁻¹(head.*)))) with ``modules/head-inv``, scores = the same with
``modules/head-inv-scores``. Over every valid image of the cache: per-image MSE of both in
normalized and [0, 1] pixel space (mean ± 95% CI), their paired difference, the mean training
image baseline, and how many queries DETR assigns to no object (one-hot hides everything a
no-object query's scores hold). Writes ``results.json``, ``per_image.csv``, ``mse.png`` and
``grid.png`` (original | one-hot | scores for the first ``n`` images).
"""

from __future__ import annotations

import os

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
    train_command,
    write_results,
)
from invcache.analysis.figures import bars_with_ci, image_grid
from invcache.cache.store import Cache
from invcache.chain import STAGE_CHAINS, LoadedModule, invert
from invcache.data.preprocess import unit_images
from invcache.distributed import resolve_device
from invcache.errors import UsageError
from invcache.inverse import make_spec
from invcache.settings import AnalyzeSettings
from invcache.taps import HEAD_BOXES, HEAD_LOGITS, INPUT

NAME = "onehot"
SPACES = ("normalized", "pixel")
# The module folder of P⁻¹ for each class input; the rest of the chain (D⁻¹, E⁻¹, B⁻¹) is shared.
HEAD_FOLDERS = {"onehot": "head-inv", "scores": "head-inv-scores"}
CHAINS = {variant: (folder, *STAGE_CHAINS["head"][1:]) for variant, folder in HEAD_FOLDERS.items()}
LABELS = {"onehot": "one-hot", "scores": "scores"}


def run(settings: AnalyzeSettings | None = None) -> dict:
    """Reconstruct every valid image of the cache through both head chains; returns (and writes) the results."""
    settings = settings or AnalyzeSettings()
    cache = open_evaluation_cache(settings.cache_location())
    rows = evaluation_rows(cache)
    taps = (INPUT, HEAD_LOGITS, HEAD_BOXES)
    require_taps(cache, taps, "the onehot analysis")
    device = resolve_device(settings.device)
    modules = head_modules(settings.modules_dir(), cache, device)
    baseline = mean_training_image(modules, cache, settings.mean_from).to(device)
    all_ids = cache.image_ids
    shown = rows[:settings.n]

    labels = ["baseline", *CHAINS]
    errors: dict[str, list[np.ndarray]] = {f"{label}_{space}": [] for label in labels for space in SPACES}
    no_object, image_ids = [], []
    grid = {"original": [], **{LABELS[v]: [] for v in CHAINS}}
    with torch.no_grad():
        for batch_rows, batch in batches(cache, taps, rows, settings.batch_size, device):
            original, logits = batch[INPUT], batch[HEAD_LOGITS]
            image_ids.append(all_ids[batch_rows])
            no_object.append(no_object_fraction(logits))
            heads = {HEAD_LOGITS: logits, HEAD_BOXES: batch[HEAD_BOXES]}
            reconstructions = {"baseline": baseline.expand(len(original), -1, -1, -1)}
            reconstructions.update({variant: invert(modules, heads, via=chain) for variant, chain in CHAINS.items()})
            for label, images in reconstructions.items():
                for space, values in image_errors(images, original).items():
                    errors[f"{label}_{space}"].append(values)
            keep = torch.from_numpy(np.isin(batch_rows, shown))
            if keep.any():
                grid["original"].append(unit_images(original[keep]).cpu())
                for variant in CHAINS:
                    grid[LABELS[variant]].append(reconstructions[variant][keep].cpu())

    per_image = {key: np.concatenate(values) for key, values in errors.items()}
    no_object_per_image = np.concatenate(no_object)
    summary = {label: {space: mean_ci(per_image[f"{label}_{space}"]) for space in SPACES} for label in labels}
    # Paired per image: the same image through both chains, so its own difficulty cancels out.
    difference = {"mse": {space: mean_ci(per_image[f"onehot_{space}"] - per_image[f"scores_{space}"])
                          for space in SPACES}}
    queries = cache.tap_shape(HEAD_LOGITS)[1]
    results = {
        "analysis": NAME, "images": int(len(rows)), "mse": summary, "onehot_minus_scores": difference,
        "no_object": {"fraction": float(no_object_per_image.mean()), "queries_per_image": queries,
                      "per_image": mean_ci(no_object_per_image)},
        "headline": {
            "one-hot MSE, [0,1] pixels": summary["onehot"]["pixel"]["mean"],
            "scores MSE, [0,1] pixels": summary["scores"]["pixel"]["mean"],
            "no-object queries (fraction)": float(no_object_per_image.mean()),
        },
        "settings": {"batch_size": settings.batch_size, "n": settings.n},
        "provenance": provenance(cache, modules),
    }
    table = [{"image_id": int(i), **{key: float(values[k]) for key, values in per_image.items()},
              "no_object_fraction": float(no_object_per_image[k])}
             for k, i in enumerate(np.concatenate(image_ids))]
    figures = {
        "mse": bars_with_ci([LABELS[v] for v in CHAINS], [summary[v]["pixel"]["mean"] for v in CHAINS],
                            [summary[v]["pixel"]["ci95"] for v in CHAINS],
                            title=f"Head-stage reconstruction error by class input ({len(rows)} images, 95% CI)",
                            ylabel="MSE, [0, 1] pixels", baseline=summary["baseline"]["pixel"]["mean"]),
        "grid": image_grid({name: torch.cat(parts) for name, parts in grid.items()},
                           [str(int(i)) for i in all_ids[shown]],
                           title="Originals and head-stage reconstructions: one-hot vs. softmax scores"),
    }
    write_results(settings.out_dir(NAME), results, {"per_image": table}, figures)
    return results


def no_object_fraction(logits: torch.Tensor) -> np.ndarray:
    """Per image (B,): the fraction of its queries whose argmax is the last class, DETR's no-object."""
    return (logits.argmax(-1) == logits.shape[-1] - 1).double().mean(-1).cpu().numpy()


def head_modules(modules_dir: str | os.PathLike, cache: Cache, device: torch.device) -> dict[str, LoadedModule]:
    """The modules of both chains, each checked to be what its folder promises.

    A P⁻¹ trained with the other class input in a folder (e.g. copied by hand) would swap the
    comparison's two sides without any other sign, so it is refused.
    """
    folders = sorted({name for chain in CHAINS.values() for name in chain})
    modules = require_modules(modules_dir, folders, cache, device)
    class_input_of = {folder: variant for variant, folder in HEAD_FOLDERS.items()}
    for folder, loaded in modules.items():
        kind = "head-inv" if folder in class_input_of else folder
        expected = make_spec(kind, cache.attrs, class_input=class_input_of.get(folder, "onehot"))
        got = loaded.spec
        if got.name != kind or got.inputs != expected.inputs:
            raise UsageError(f"module {loaded.directory} is a {got.name} reading {', '.join(got.inputs)}, but the "
                             f"{folder} link of the head chain is a {kind} reading {', '.join(expected.inputs)}")
        if got.config.get("class_input") != expected.config.get("class_input"):
            raise UsageError(f"module {loaded.directory} was trained with --class-input {got.config['class_input']}, "
                             f"but the {folder} folder holds the one trained by `{train_command(folder)}`")
    return modules
