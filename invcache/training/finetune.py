"""End-to-end fine-tuning of DETR with the inverse chain B⁻¹∘E⁻¹∘D⁻¹ on (1 − λ)·L_det + λ·L_rec: one run per λ
of ``analyze tradeoff`` (SPEC §5), saved whole after every epoch so that a rerun continues it.

- L_det: DETR's own loss (:class:`invcache.models.loss.SetCriterion`: Hungarian matching with costs class 1,
  L1 5, GIoU 2; cross-entropy with no-object weight 0.1 + 5·L1 + 2·GIoU, on every decoder layer);
- L_rec: the MSE between the normalized image and the normalized B⁻¹(E⁻¹(D⁻¹(dec.L))), B⁻¹'s own loss.

The authors' settings: Adam at ``lr`` for DETR and for each module, each model's gradients clipped to norm 0.1
(DETR's clipping), DETR's training dropout 0.1, and DETR's frozen parts (the backbone's batch norms, stem and
layer1). B⁻¹'s batch norms keep their trained statistics too, so what is optimized is what is evaluated and
λ = 0 leaves the modules exactly as they were trained. The images are a cache's ``input`` (exactly what DETR
saw), the targets come from its annotation file.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO

from invcache import taps as T
from invcache.cache.batches import CacheBatches
from invcache.cache.provenance import differences
from invcache.cache.store import Cache
from invcache.chain import STAGE_CHAINS, LoadedModule
from invcache.data.preprocess import normalize
from invcache.errors import InvcacheError, UsageError
from invcache.hashing import bytes_sha256, file_sha256
from invcache.inverse import inverse_loss
from invcache.models import DETR
from invcache.models.loss import SetCriterion, coco_target
from invcache.models.matcher import DetrTarget
from invcache.models.weights import weights_sha256
from invcache.settings import SHUFFLE_WINDOW
from invcache.taps import INPUT
from invcache.training import checkpoint
from invcache.training.detr import dropout, make_trainable

CHAIN = STAGE_CHAINS["decoder"]  # D⁻¹, E⁻¹, B⁻¹: dec.L back to pixels
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


def run_settings(start: DETR, modules: Mapping[str, LoadedModule], train: Cache, annotation: dict, lr: float,
                 batch_size: int, seed: int) -> dict:
    """What every λ's run is fine-tuned with, but λ (``run.json``'s ``settings``; :data:`RESUME_KEYS` must match)."""
    ids = train.image_ids[train.valid].astype(np.int64)
    return {
        "lr": lr, "batch_size": batch_size, "seed": seed, "clip_max_norm": CLIP_MAX_NORM, "dropout": DROPOUT,
        "detr": {"model": start.config.name, "weights_sha256": start.fingerprint["weights_sha256"]},
        "modules": {name: file_sha256(modules[name].directory / "best.safetensors") for name in CHAIN},
        # the images and their order: which are valid, and the shards CacheBatches shuffles together
        "train_images": {"count": len(ids), "ids_sha256": bytes_sha256(ids.tobytes()), "shard_size": train.shard_size,
                         "shuffle_window": SHUFFLE_WINDOW},
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
    make_trainable(detr, train_backbone=True)
    for module in chain.values():
        module.requires_grad_(True)
    optimizers = {name: torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=settings["lr"])
                  for name, model in models.items()}
    if state["epochs"]:
        restore(folder, models, optimizers)
    if state["epochs"] > epochs:
        log.warning("%s holds %d epochs of fine-tuning, more than the %d asked for; it is evaluated as it is",
                    folder, state["epochs"], epochs)
    criterion = SetCriterion(num_classes=detr.config.num_classes).to(device)
    decoder_taps = [T.dec(k) for k in range(1, detr.config.num_decoder_layers + 1)]

    # one reader for every epoch: its buffers are reused
    batches = CacheBatches(train.location, [INPUT], settings["batch_size"], seed=settings["seed"],
                           shuffle_window=settings["train_images"]["shuffle_window"], device=device)
    for epoch in range(state["epochs"], epochs):
        started = time.perf_counter()
        batches.set_epoch(epoch)
        detr.train()  # for its dropout; its batch norms are frozen statistics
        for module in chain.values():  # B⁻¹'s batch norms keep their trained statistics, as DETR's do
            module.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        steps = 0
        # dropout draws from a generator seeded by (seed, epoch); fork_rng leaves the caller's RNG as it was
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), dropout(detr, DROPOUT):
            torch.manual_seed(hash((settings["seed"], epoch)) & 0x7FFF_FFFF_FFFF_FFFF)
            for batch in batches:
                images = batch[INPUT].to(device)
                targets = [detr_target(coco, int(i), detr.config.num_classes, device) for i in batch["image_id"]]
                embeddings = detr(normalize(images), decoder_taps)
                loss_det = criterion.total(criterion(detr.predictions(embeddings), targets))
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
        log.info("tradeoff λ=%s: epoch %d/%d, loss %.5f (L_det %.5f, L_rec %.5f)", lambda_text(lam), epoch + 1, epochs,
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


def _sibling(folder: Path, suffix: str) -> Path:
    return folder.with_name(f"{folder.name}.{suffix}")



def lambda_text(value: float) -> str:
    """λ as written: the shortest decimal that reads back as the same float (0, 0.25, 1)."""
    return np.format_float_positional(value, trim="-")
