"""``invcache analyze tradeoff``: what does DETR give up in detection to keep the image, and the other way round?
(SPEC §5, the paper's contextualizing experiment)

From the DETR the evaluation cache was made with (its recorded weights, checked against the recorded sha256)
and the workspace's trained B⁻¹, E⁻¹ and D⁻¹, DETR and the three modules are fine-tuned together, once per
λ, on L = (1 − λ)·L_det + λ·L_rec with the authors' settings (:mod:`invcache.training.finetune`). Fine-tuning
changes DETR, so no activation is read from a cache: the images are the caches' ``input`` (exactly what DETR
saw), the targets come from the annotation file each cache records.

Each λ is one run, ``<out>/runs/lambda-<λ>/``, saved whole after every epoch
(:func:`~invcache.training.finetune.save_run`): a rerun continues it from its last epoch, and a run that has all
``epochs`` is only evaluated. Then, over every valid image of the evaluation cache, per λ: the fine-tuned DETR's
box AP on the cached ``input`` (scored as ``analyze ap`` scores cached heads) and the MSE of B⁻¹(E⁻¹(D⁻¹(dec.L)))
with the fine-tuned DETR and modules; next to the *default* row (the original DETR with its independently trained
modules: AP of the cached heads, MSE of the cached dec.L through the modules, as ``analyze ap`` and the decoder
stage of ``analyze stages`` give them) and the average-guessing baseline (the mean training image). Writes
``results.json``, ``tradeoff.csv``, ``per_image.csv``, ``tradeoff.png`` (AP and MSE against λ) and ``grid.png``
(originals, one column per λ, default).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from invcache.analysis.ap import coco_detections, evaluate_bbox, open_annotations, require_images
from invcache.analysis.common import (
    batches,
    evaluation_rows,
    image_errors,
    mean_ci,
    mean_training_image,
    open_evaluation_cache,
    provenance,
    recorded_weights,
    require_taps,
    write_results,
)
from invcache.analysis.figures import image_grid
from invcache.analysis.stages import grid_rows, stage_modules
from invcache.cache import schema as S
from invcache.cache.store import Cache
from invcache.chain import LoadedModule, invert
from invcache.data.detection import check_annotations
from invcache.data.preprocess import unit_images
from invcache.distributed import resolve_device
from invcache.errors import InvcacheError, UsageError
from invcache.forward import forward_taps
from invcache.models import DETR, build_detr
from invcache.settings import TRADEOFF_EPOCHS, TRADEOFF_LAMBDAS, TRADEOFF_LR, AnalyzeSettings
from invcache.taps import HEAD_BOXES, HEAD_LOGITS, INPUT
from invcache.training.checkpoint import cache_fingerprint, check_compatible
from invcache.training.finetune import (
    CHAIN,
    CLIP_MAX_NORM,
    DROPOUT,
    finetune,
    lambda_text,
    run_settings,
    saved_state,
)
from invcache.workspace import TRAIN_SPLIT, Workspace

NAME = "tradeoff"
SPACES = ("normalized", "pixel")

log = logging.getLogger(__name__)


def run(settings: AnalyzeSettings | None = None, *, lambdas: Sequence[float] = TRADEOFF_LAMBDAS,
        epochs: int = TRADEOFF_EPOCHS, train_cache: str | None = None, lr: float = TRADEOFF_LR,
        annotations: str | os.PathLike | None = None, train_annotations: str | os.PathLike | None = None,
        seed: int = 0) -> dict:
    """Fine-tune DETR with B⁻¹, E⁻¹, D⁻¹ for each λ (or continue the runs), evaluate each; returns (and writes) the
    results.

    ``train_cache``: the cache whose images fine-tune [default: ``<root>/cache/train2017``];
    ``settings.batch_size`` is the fine-tuning batch and the evaluation batch. ``annotations`` /
    ``train_annotations``: the COCO annotation files of the evaluation / training images, where a cache records
    none (webdataset) or its file has moved. ``seed`` picks the order of the training images and the dropout.
    """
    settings = settings or AnalyzeSettings()
    lambdas = checked_lambdas(lambdas)
    if epochs < 1:
        raise UsageError(f"--epochs must be at least 1, not {epochs}")
    if not (math.isfinite(lr) and lr > 0):
        raise UsageError(f"--lr must be a positive number, not {lr}")
    cache = open_evaluation_cache(settings.cache_location())
    rows = evaluation_rows(cache)
    device = resolve_device(settings.device)
    modules = stage_modules(settings.modules_dir(), ["decoder"], cache, device)
    embedding = modules[CHAIN[0]].spec.inputs[0]
    require_taps(cache, (INPUT, embedding, HEAD_LOGITS, HEAD_BOXES), "the trade-off analysis")
    train = training_cache(train_cache or str(Workspace.at(settings.workspace).cache(TRAIN_SPLIT)), cache)
    coco, annotation = open_annotations(cache, annotations)
    image_ids = cache.image_ids[rows]
    require_images(coco, image_ids, cache, annotation)
    train_coco, train_annotation = open_annotations(train, train_annotations, "--train-annotations")
    train_ids = train.image_ids[train.valid]
    require_images(train_coco, train_ids, train, train_annotation, "--train-annotations")
    start = starting_detr(cache, device)
    check_annotations(train_coco, train_ids.tolist(), start.config.num_classes, train_annotation["file"])
    baseline = mean_training_image(modules, cache, settings.mean_from).to(device)
    shown = np.sort(grid_rows(cache, rows, None, settings.n))
    common = run_settings(start, modules, train, train_annotation, lr, settings.batch_size, seed)
    folders = {lam: settings.out_dir(NAME) / "runs" / f"lambda-{lambda_text(lam)}" for lam in lambdas}
    # every saved run is checked before any work: one made with other settings is refused at once
    states = {lam: saved_state(folders[lam], {"lambda": lam, **common}) for lam in lambdas}

    labels = {lam: f"λ={lambda_text(lam)}" for lam in lambdas}
    default = evaluate(cache, rows, None, modules, settings.batch_size, device, shown)
    ap = {"default": evaluate_bbox(coco, default["detections"], image_ids)["ap"]}
    errors = {"default": default["errors"]}
    grid = {"default": default["grid"]}
    runs = {}
    for lam in lambdas:
        folder = folders[lam]
        tuned = finetune(lam, folder, states[lam], start, modules, train, train_coco, epochs, device)
        outcome = evaluate(cache, rows, tuned.detr, tuned.modules, settings.batch_size, device, shown)
        label = labels[lam]
        ap[label] = evaluate_bbox(coco, outcome["detections"], image_ids)["ap"]
        errors[label], grid[label] = outcome["errors"], outcome["grid"]
        runs[label] = {"run": str(folder), "epochs": tuned.state["epochs"], "steps": tuned.state["steps"],
                       "history": tuned.state["history"]}
        del tuned, outcome  # one fine-tuned DETR in memory at a time
    errors["baseline"] = guess_errors(cache, rows, baseline, settings.batch_size, device)

    order = [*labels.values(), "default", "baseline"]
    mse = {label: {space: mean_ci(errors[label][space]) for space in SPACES} for label in order}
    results = {
        "analysis": NAME, "images": int(len(rows)),
        "lambdas": [{"lambda": lam, "label": labels[lam], "AP": ap[labels[lam]]["AP"], "AP50": ap[labels[lam]]["AP50"],
                     "ap": ap[labels[lam]], "mse": mse[labels[lam]], **runs[labels[lam]]} for lam in lambdas],
        "default": {"AP": ap["default"]["AP"], "AP50": ap["default"]["AP50"], "ap": ap["default"],
                    "mse": mse["default"]},
        "baseline": {"mean_image_of": settings.mean_from or modules["backbone-inv"].meta["train_cache"],
                     "mse": mse["baseline"]},
        "mse": mse,
        "annotations": annotation, "train_annotations": train_annotation,
        "headline": {
            **{f"{name}, {label}": value for label in (*labels.values(), "default")
               for name, value in (("AP", ap[label]["AP"]), ("MSE, [0,1] pixels", mse[label]["pixel"]["mean"]))},
            "MSE, [0,1] pixels, mean image": mse["baseline"]["pixel"]["mean"],
        },
        "settings": {"lambdas": lambdas, "epochs": epochs, "lr": lr, "batch_size": settings.batch_size, "seed": seed,
                     "clip_max_norm": CLIP_MAX_NORM, "dropout": DROPOUT, "train_cache": train.location,
                     "n": settings.n, "mean_from": settings.mean_from},
        "provenance": {**provenance(cache, modules), "train_cache": provenance(train)["cache"],
                       "detr": start.fingerprint},
    }
    lambda_of = {label: lam for lam, label in labels.items()}
    summary = [{"row": label, "lambda": lambda_of.get(label), "AP": ap.get(label, {}).get("AP"),
                "AP50": ap.get(label, {}).get("AP50"),
                **{f"mse_{space}{suffix}": mse[label][space][key] for space in SPACES
                   for suffix, key in (("", "mean"), ("_ci95", "ci95"))},
                "epochs": runs.get(label, {}).get("epochs"), "run": runs.get(label, {}).get("run")} for label in order]
    per_image = [{"image_id": int(image_id), **{f"{label}_{space}": float(errors[label][space][k])
                                               for label in order for space in SPACES}}
                 for k, image_id in enumerate(image_ids)]
    originals = unit_images(next(batches(cache, (INPUT,), shown, len(shown)))[1][INPUT])
    figures = {
        "tradeoff": tradeoff_figure(lambdas, [ap[labels[lam]] for lam in lambdas], ap["default"],
                                    [mse[labels[lam]] for lam in lambdas], mse["default"], mse["baseline"], len(rows)),
        "grid": image_grid({"original": originals, **{labels[lam]: grid[labels[lam]] for lam in lambdas},
                            "default": grid["default"]}, [str(int(i)) for i in cache.image_ids[shown]],
                           title="Originals and B⁻¹(E⁻¹(D⁻¹(dec.L))) after fine-tuning with each λ"),
    }
    write_results(settings.out_dir(NAME), results, {"tradeoff": summary, "per_image": per_image}, figures)
    return results


def checked_lambdas(lambdas: Sequence[float]) -> list[float]:
    """The λ values, each once, in the order given; none, or one outside [0, 1] (NaN too), is a usage error."""
    chosen = list(dict.fromkeys(float(value) + 0.0 for value in lambdas))  # + 0.0: -0.0 is 0
    if not chosen:
        raise UsageError("no λ given (--lambdas); give values in [0, 1], e.g. 0,0.5,1")
    for value in chosen:
        if not 0 <= value <= 1:
            raise UsageError(f"λ {value} is outside [0, 1] (--lambdas)")
    return chosen


def training_cache(location: str, cache: Cache) -> Cache:
    """The cache whose images fine-tune: complete, holding ``input``, made by the evaluation cache's DETR and
    preprocessing (the modules were trained on such caches)."""
    if not Cache.exists(location):
        raise UsageError(f"no training cache at {location}; make it with `invcache extract --split {TRAIN_SPLIT} "
                         "--layers all` or pass --train-cache")
    train = Cache.open(location)
    evaluation_rows(train)  # refuses a cache still being written or without a valid image
    require_taps(train, (INPUT,), "fine-tuning DETR")
    try:
        check_compatible(cache_fingerprint(train.attrs), cache.attrs, f"the training cache {location}",
                         f"the cache {cache.location}")
    except InvcacheError as exc:
        raise UsageError(str(exc)) from None
    return train


def starting_detr(cache: Cache, device: torch.device) -> DETR:
    """The DETR the cache was made with: its recorded weights, which must still have the recorded sha256."""
    model, weights = cache.attrs["model"], recorded_weights(cache)
    try:
        with torch.random.fork_rng(devices=[]):  # the initialisers the weights overwrite leave the caller's RNG alone
            detr = build_detr(model["model"], weights, device)
    except InvcacheError as exc:
        raise UsageError(f"the DETR the cache {cache.location} was made with cannot be built again ({exc})") from None
    if detr.fingerprint["weights_sha256"] != model["weights_sha256"]:
        raise UsageError(f"the weights {weights} are no longer those the cache {cache.location} was made with (sha256 "
                         f"{detr.fingerprint['weights_sha256'][:12]}…, recorded {model['weights_sha256'][:12]}…)")
    return detr


@torch.no_grad()
def evaluate(cache: Cache, rows: np.ndarray, detr: DETR | None, modules: Mapping[str, LoadedModule],
             batch_size: int, device: torch.device, shown: np.ndarray) -> dict:
    """COCO detections, per-image errors of B⁻¹(E⁻¹(D⁻¹(dec.L))) and the reconstructions of the ``shown`` rows.

    With ``detr``, its heads and dec.L on the cached ``input`` (a fine-tuned DETR); without, the cached heads and
    dec.L themselves (the DETR the cache was made with), as ``analyze ap`` and ``analyze stages`` read them.
    """
    embedding = modules[CHAIN[0]].spec.inputs[0]
    outputs_taps = (embedding, HEAD_LOGITS, HEAD_BOXES)
    orig_size = torch.from_numpy(cache.read(S.ORIG_SIZE, 0, cache.num_images))
    detections, errors, grid = [], {space: [] for space in SPACES}, []
    read = (INPUT,) if detr is not None else (INPUT, *outputs_taps)
    for batch_rows, batch in batches(cache, read, rows, batch_size, device):
        outputs = forward_taps(detr, batch[INPUT], outputs_taps) if detr is not None else batch
        detections += coco_detections(cache.image_ids[batch_rows], outputs[HEAD_LOGITS].cpu(),
                                      outputs[HEAD_BOXES].cpu(), orig_size[batch_rows])
        reconstruction = invert(modules, {embedding: outputs[embedding]}, via=CHAIN)
        for space, values in image_errors(reconstruction, batch[INPUT]).items():
            errors[space].append(values)
        grid.append(reconstruction[torch.from_numpy(np.isin(batch_rows, shown))].cpu())
    return {"detections": detections, "errors": {space: np.concatenate(v) for space, v in errors.items()},
            "grid": torch.cat(grid)}


def guess_errors(cache: Cache, rows: np.ndarray, image: torch.Tensor, batch_size: int, device: torch.device
                 ) -> dict[str, np.ndarray]:
    """Per-image errors of guessing ``image`` (3, H, W) for each of ``rows`` (the average-guessing baseline)."""
    errors: dict[str, list[np.ndarray]] = {space: [] for space in SPACES}
    for _, batch in batches(cache, (INPUT,), rows, batch_size, device):
        for space, values in image_errors(image.expand(len(batch[INPUT]), -1, -1, -1), batch[INPUT]).items():
            errors[space].append(values)
    return {space: np.concatenate(values) for space, values in errors.items()}


def tradeoff_figure(lambdas: Sequence[float], ap: Sequence[dict], default_ap: dict, mse: Sequence[dict],
                    default_mse: dict, baseline_mse: dict, images: int) -> Figure:
    """AP and AP50 (left) and the MSE ± 95% CI (right) against λ; the default DETR with its independently trained
    modules, and the mean image, as dashed lines."""
    figure = Figure(figsize=(10.0, 3.9))
    left, right = figure.subplots(1, 2)
    for stat, marker, color in (("AP", "o", "#4c72b0"), ("AP50", "s", "#55a868")):
        left.plot(lambdas, [_value(a[stat]) for a in ap], marker=marker, color=color, label=f"{stat}, fine-tuned")
        if default_ap[stat] is not None:
            left.axhline(default_ap[stat], color=color, linestyle="--", label=f"{stat}, default DETR")
    highest = np.nanmax([_value(a[stat]) for a in (*ap, default_ap) for stat in ("AP", "AP50")] + [0.0])
    left.set_ylim(0, max(0.1, 1.15 * highest))  # AP is in [0, 1]: no axis magnified around zero
    left.set_ylabel("box AP, evaluation images")
    right.errorbar(lambdas, [m["pixel"]["mean"] for m in mse], yerr=np.nan_to_num([m["pixel"]["ci95"] for m in mse]),
                   marker="o", capsize=3, color="#4c72b0", label="fine-tuned DETR and modules")
    right.axhline(default_mse["pixel"]["mean"], color="#4c72b0", linestyle="--",
                  label="default DETR, modules trained alone")
    right.axhline(baseline_mse["pixel"]["mean"], color="#c44e52", linestyle="--", label="mean image")
    right.set_ylabel("MSE of B⁻¹(E⁻¹(D⁻¹(dec.L))), [0, 1] pixels")
    for ax in (left, right):
        ax.set_xticks(lambdas, [lambda_text(lam) for lam in lambdas])
        ax.set_xlabel("λ (weight of the reconstruction loss)")
        ax.legend(frameon=False, fontsize="small")
        ax.spines[["top", "right"]].set_visible(False)
    figure.suptitle(f"Fine-tuning on (1 − λ)·L_det + λ·L_rec: detection against reconstruction ({images} images, "
                    "95% CI)")
    return figure


def _value(value: float | None) -> float:
    return math.nan if value is None else value
