"""``invcache analyze tradeoff``: what does DETR give up in detection to keep the image, and the other way round?
(SPEC §5, the paper's contextualizing experiment)

From the DETR the evaluation cache was made with (its recorded weights, checked against the recorded sha256)
and the workspace's trained B⁻¹, E⁻¹ and D⁻¹, DETR and the three modules are fine-tuned together, once per
λ, on L = (1 − λ)·L_det + λ·L_rec:

- L_det: DETR's own loss (:class:`invcache.models.loss.SetCriterion`: Hungarian matching with costs class 1,
  L1 5, GIoU 2; cross-entropy with no-object weight 0.1 + 5·L1 + 2·GIoU, on every decoder layer);
- L_rec: the MSE between the normalized image and the normalized B⁻¹(E⁻¹(D⁻¹(dec.L))), B⁻¹'s own loss.

The authors' settings: Adam at ``lr`` 1e-5 for DETR and for each module, each model's gradients clipped to
norm 0.1 (DETR's clipping), DETR's training dropout 0.1, and DETR's frozen parts (the backbone's batch norms,
stem and layer1). B⁻¹'s batch norms keep their trained statistics too, so what is optimized is what is evaluated
and λ = 0 leaves the modules exactly as they were trained. Fine-tuning changes DETR, so no activation is read
from a cache: the images are the caches' ``input`` (exactly what DETR saw), the targets come from the annotation
file each cache records.

Each λ is one run, ``<out>/runs/lambda-<λ>/``, saved whole after every epoch (:func:`save_run`): a rerun
continues it from its last epoch, and a run that has all ``epochs`` is only evaluated. Then, over every valid
image of the evaluation cache, per λ: the fine-tuned DETR's box AP on the cached ``input`` (scored as ``analyze
ap`` scores cached heads) and the MSE of B⁻¹(E⁻¹(D⁻¹(dec.L))) with the fine-tuned DETR and modules; next to the
*default* row (the original DETR with its independently trained modules: AP of the cached heads, MSE of the
cached dec.L through the modules, as ``analyze ap`` and the decoder stage of ``analyze stages`` give them) and
the average-guessing baseline (the mean training image). Writes ``results.json``, ``tradeoff.csv``,
``per_image.csv``, ``tradeoff.png`` (AP and MSE against λ) and ``grid.png`` (originals, one column per λ, default).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import pickle
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from pycocotools.coco import COCO

from invcache import taps as T
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
from invcache.cache.provenance import differences
from invcache.cache.store import Cache
from invcache.chain import STAGE_CHAINS, LoadedModule, invert
from invcache.data.detection import check_annotations
from invcache.data.preprocess import normalize, unit_images
from invcache.distributed import resolve_device
from invcache.errors import InvcacheError, UsageError
from invcache.forward import forward_taps
from invcache.hashing import bytes_sha256, file_sha256
from invcache.inverse import inverse_loss
from invcache.models import DETR, build_detr
from invcache.models.detr import DetrOutputs, DetrPredictions
from invcache.models.loss import SetCriterion, coco_target
from invcache.models.matcher import DetrTarget
from invcache.models.weights import weights_sha256
from invcache.settings import TRADEOFF_EPOCHS, TRADEOFF_LAMBDAS, TRADEOFF_LR, AnalyzeSettings
from invcache.taps import HEAD_BOXES, HEAD_LOGITS, INPUT
from invcache.training import checkpoint
from invcache.training.checkpoint import cache_fingerprint, check_compatible
from invcache.training.detr import dropout
from invcache.workspace import TRAIN_SPLIT, Workspace

NAME = "tradeoff"
CHAIN = STAGE_CHAINS["decoder"]  # D⁻¹, E⁻¹, B⁻¹: dec.L back to pixels
SPACES = ("normalized", "pixel")
# The authors' fine-tuning: every model's gradients clipped to DETR's norm, DETR's training dropout.
CLIP_MAX_NORM = 0.1
DROPOUT = 0.1
DETR_CHECKPOINT = "detr.pth"
RUN_RECORD = "run.json"
# What a run continued by a rerun must share with the saved one; the training cache may move, the epochs grow.
RESUME_KEYS = ("lambda", "lr", "batch_size", "seed", "clip_max_norm", "dropout", "detr", "modules", "train_images",
               "train_annotations")

log = logging.getLogger(__name__)


@dataclass
class FineTuned:
    """One λ's run after its last epoch: DETR and the chain's modules (frozen, in eval mode) and its ``run.json``."""

    detr: DETR
    modules: dict[str, LoadedModule]
    state: dict


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
    folders = {lam: settings.out_dir(NAME) / "runs" / f"lambda-{_number(lam)}" for lam in lambdas}
    # every saved run is checked before any work: one made with other settings is refused at once
    states = {lam: saved_state(folders[lam], {"lambda": lam, **common}) for lam in lambdas}

    labels = {lam: f"λ={_number(lam)}" for lam in lambdas}
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


def run_settings(start: DETR, modules: Mapping[str, LoadedModule], train: Cache, annotation: dict, lr: float,
                 batch_size: int, seed: int) -> dict:
    """What every λ's run is fine-tuned with, but λ (``run.json``'s ``settings``; :data:`RESUME_KEYS` must match)."""
    ids = train.image_ids[train.valid].astype(np.int64)
    return {
        "lr": lr, "batch_size": batch_size, "seed": seed, "clip_max_norm": CLIP_MAX_NORM, "dropout": DROPOUT,
        "detr": {"model": start.config.name, "weights_sha256": start.fingerprint["weights_sha256"]},
        "modules": {name: file_sha256(modules[name].directory / "best.safetensors") for name in CHAIN},
        # the images and their order: which are valid, and the shards CacheSamples shuffles
        "train_images": {"count": len(ids), "ids_sha256": bytes_sha256(ids.tobytes()), "shard_size": train.shard_size},
        "train_annotations": annotation["sha256"],
        "train_cache": train.location, "detr_weights": start.fingerprint["weights"],
    }


def finetune(lam: float, folder: Path, state: dict, start: DETR, modules: Mapping[str, LoadedModule], train: Cache,
             coco: COCO, epochs: int, device: torch.device) -> FineTuned:
    """DETR and D⁻¹, E⁻¹, B⁻¹ fine-tuned together on (1 − λ)·L_det + λ·L_rec up to ``epochs`` epochs.

    ``state`` is the run's (:func:`saved_state`): a run saved in ``folder`` continues from its last epoch. Data
    order and dropout depend only on (seed, epoch), so a continued run ends where an uninterrupted one ends.
    """
    settings = state["settings"]
    detr = copy.deepcopy(start)
    chain = {name: copy.deepcopy(modules[name].module) for name in CHAIN}
    models: dict[str, torch.nn.Module] = {"detr": detr, **chain}
    for model in models.values():
        model.requires_grad_(True)
    for name, parameter in detr.backbone.named_parameters():  # as DETR trains: layer2-4 of the backbone only
        parameter.requires_grad_(any(f".layer{k}." in name for k in (2, 3, 4)))
    optimizers = {name: torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=settings["lr"])
                  for name, model in models.items()}
    if state["epochs"]:
        restore(folder, models, optimizers)
    if state["epochs"] > epochs:
        log.warning("%s holds %d epochs of fine-tuning, more than the %d asked for; it is evaluated as it is",
                    folder, state["epochs"], epochs)
    criterion = SetCriterion(num_classes=detr.config.num_classes).to(device)
    decoder_taps = [T.dec(k) for k in range(1, detr.config.num_decoder_layers + 1)]

    for epoch in range(state["epochs"], epochs):
        started = time.perf_counter()
        samples = train.as_dataset([INPUT], seed=settings["seed"], epoch=epoch)
        loader = torch.utils.data.DataLoader(samples, batch_size=settings["batch_size"])
        detr.train()  # for its dropout; its batch norms are frozen statistics
        for module in chain.values():  # B⁻¹'s batch norms keep their trained statistics, as DETR's do
            module.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        steps = 0
        # dropout draws from a generator seeded by (seed, epoch); fork_rng leaves the caller's RNG as it was
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), dropout(detr, DROPOUT):
            torch.manual_seed(hash((settings["seed"], epoch)) & 0x7FFF_FFFF_FFFF_FFFF)
            for batch in loader:
                images = batch[INPUT].to(device)
                targets = [detr_target(coco, int(i), detr.config.num_classes, device) for i in batch["image_id"]]
                embeddings = detr(normalize(images), decoder_taps)
                loss_det = criterion.total(criterion(detection_outputs(detr, embeddings, decoder_taps), targets))
                reconstruction = embeddings[decoder_taps[-1]]
                for name in CHAIN:
                    reconstruction = chain[name](reconstruction)
                loss_rec = inverse_loss(modules["backbone-inv"].spec, reconstruction, {INPUT: images})
                loss = (1 - lam) * loss_det + lam * loss_rec
                if not torch.isfinite(loss):  # no stall: the matcher has already waited for this forward
                    raise InvcacheError(f"λ {lam}: the loss is not finite at epoch {epoch + 1}, step {steps + 1} "
                                        f"(images {', '.join(str(int(i)) for i in batch['image_id'])}); stopped, "
                                        f"{folder} keeps the last finished epoch")
                for optimizer in optimizers.values():
                    optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for model in models.values():
                    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_MAX_NORM)
                for optimizer in optimizers.values():
                    optimizer.step()
                sums += torch.stack([loss, loss_det, loss_rec]).detach().double()
                steps += 1
        means = dict(zip(("loss", "loss_det", "loss_rec"), (sums / steps).tolist()))
        state["history"].append({"epoch": epoch + 1, "steps": steps, **means,
                                 "seconds": round(time.perf_counter() - started, 3)})
        state["epochs"], state["steps"] = epoch + 1, state["steps"] + steps
        log.info("tradeoff λ=%s: epoch %d/%d, loss %.5f (L_det %.5f, L_rec %.5f)", _number(lam), epoch + 1, epochs,
                 means["loss"], means["loss_det"], means["loss_rec"])
        save_run(folder, models, optimizers, state, {name: modules[name].spec.to_dict() for name in CHAIN},
                 train.attrs["preprocessing"])

    for model in models.values():
        model.requires_grad_(False).eval()
    meta = {"epoch": state["epochs"], "settings": state["settings"]}
    return FineTuned(detr, {name: LoadedModule(modules[name].spec, chain[name], meta, folder / name)
                            for name in CHAIN}, state)


def detr_target(coco: COCO, image_id: int, num_classes: int, device: torch.device) -> DetrTarget:
    """DETR's ground truth of one image, on ``device``: boxes normalized by the original size in the annotation
    record, which makes them those of the resized image too (the resize ignores the aspect ratio)."""
    target = coco_target(coco.imgs[image_id], coco.imgToAnns.get(image_id, []), num_classes)
    return DetrTarget(labels=target["labels"].to(device), boxes=target["boxes"].to(device))


def detection_outputs(detr: DETR, embeddings: Mapping[str, torch.Tensor], decoder_taps: Sequence[str]) -> DetrOutputs:
    """:meth:`DETR.detection_outputs` from the taps ``dec.1..dec.L`` of a forward already run, so that one forward
    gives both the loss's predictions and the decoder embedding L_rec inverts."""
    predictions = [DetrPredictions(pred_logits=detr.class_embed(embeddings[tap]),
                                   pred_boxes=detr.bbox_embed(embeddings[tap]).sigmoid()) for tap in decoder_taps]
    return DetrOutputs(**predictions[-1], aux_outputs=predictions[:-1])


def saved_state(folder: Path, settings: dict) -> dict:
    """The state of the run in ``folder`` (its ``run.json``: settings, epochs and steps done, per-epoch losses), or
    a fresh one with ``settings`` where nothing was saved. A run saved with other settings is refused, naming them."""
    previous = _sibling(folder, "previous")
    if not folder.exists() and previous.exists():  # killed between the two renames of save_run
        os.replace(previous, folder)
    if not folder.exists():
        return {"settings": settings, "epochs": 0, "steps": 0, "history": []}
    try:
        state = json.loads((folder / RUN_RECORD).read_text())
        changed = differences(state["settings"], settings, RESUME_KEYS)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvcacheError(f"{folder} is not a run of `analyze tradeoff` ({RUN_RECORD}: {exc}); remove it to "
                            "fine-tune this λ anew") from None
    if changed:
        raise UsageError(f"{folder} was fine-tuned with other settings ({'; '.join(changed)}); remove it to fine-tune "
                         "anew, or pass --out elsewhere")
    return {**state, "settings": settings}


def restore(folder: Path, models: Mapping[str, torch.nn.Module],
            optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
    """Load the weights and Adam states the run in ``folder`` saved into ``models`` and ``optimizers``."""
    try:
        saved = torch.load(folder / DETR_CHECKPOINT, map_location="cpu", weights_only=True)
        models["detr"].load_state_dict(saved["model"])
        optimizers["detr"].load_state_dict(saved["optimizer"])
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, pickle.UnpicklingError) as exc:
        raise InvcacheError(f"{folder / DETR_CHECKPOINT} cannot be restored ({exc}); remove {folder} to fine-tune "
                            "this λ anew") from None
    for name in CHAIN:
        module, meta, tensors = checkpoint.load(folder / name, "best")
        models[name].load_state_dict(module.state_dict())
        checkpoint.load_optimizer_state(optimizers[name], meta, tensors, folder / name)


def save_run(folder: Path, models: Mapping[str, torch.nn.Module], optimizers: Mapping[str, torch.optim.Optimizer],
             state: dict, specs: Mapping[str, dict], preprocessing: dict) -> None:
    """Write the run as it stands after an epoch, as a whole: into ``<folder>.partial``, which then replaces ``folder``.

    - ``detr.pth``: the official training-checkpoint layout (``model``, ``optimizer``, ``epoch`` 0-based,
      ``args``), which ``--weights PATH`` and ``build_detr`` load;
    - ``<module>/best.*``: each module as ``invcache train`` writes a checkpoint (with its Adam state), its cache
      fingerprint that of the fine-tuned DETR, so ``--modules <folder>`` pairs them with a cache extracted with
      ``--weights <folder>/detr.pth``;
    - ``run.json``: the settings, the epochs and steps done, the mean losses of each epoch.

    A kill leaves a whole epoch: the previous folder, or ``<folder>.previous`` between the two renames, which
    :func:`saved_state` takes back.
    """
    detr = models["detr"]
    fingerprint = {"model": {"name": detr.config.name, "config": detr.config.to_dict(),
                             "weights_sha256": weights_sha256(detr)}, "preprocessing": preprocessing}
    staging, previous = _sibling(folder, "partial"), _sibling(folder, "previous")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    torch.save({"model": {k: v.detach().contiguous().cpu() for k, v in detr.state_dict().items()},
                "optimizer": optimizers["detr"].state_dict(), "epoch": state["epochs"] - 1, "args": state["settings"]},
               staging / DETR_CHECKPOINT)
    for name in CHAIN:
        checkpoint.save(staging / name, "best", models[name],
                        {"spec": specs[name], "cache": fingerprint, "epoch": state["epochs"],
                         "settings": state["settings"], "train_cache": state["settings"]["train_cache"]},
                        optimizers[name])
    (staging / RUN_RECORD).write_text(json.dumps(state, indent=1))
    shutil.rmtree(previous, ignore_errors=True)
    if folder.exists():
        os.replace(folder, previous)
    os.replace(staging, folder)
    shutil.rmtree(previous, ignore_errors=True)


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
        ax.set_xticks(lambdas, [_number(lam) for lam in lambdas])
        ax.set_xlabel("λ (weight of the reconstruction loss)")
        ax.legend(frameon=False, fontsize="small")
        ax.spines[["top", "right"]].set_visible(False)
    figure.suptitle(f"Fine-tuning on (1 − λ)·L_det + λ·L_rec: detection against reconstruction ({images} images, "
                    "95% CI)")
    return figure


def _sibling(folder: Path, suffix: str) -> Path:
    return folder.with_name(f"{folder.name}.{suffix}")


def _number(value: float) -> str:
    """λ as written: the shortest decimal that reads back as the same float (0, 0.25, 1)."""
    return np.format_float_positional(value, trim="-")


def _value(value: float | None) -> float:
    return math.nan if value is None else value
