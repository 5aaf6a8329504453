"""Training steps/s of ``invcache train detr``'s step vs a plain training loop on the same batch (target ≥ 0.9×).

The plain loop is what one writes without invcache: DETR's training forward, the loss (on float32
predictions: the matcher has no bf16 kernels on CUDA), backward, gradient clipping and AdamW's
step. The trainer's step (:func:`invcache.training.detr.train_step`) adds the grad scaler and the
check that the loss is finite on every rank.
Both start from the same weights, with the same optimizer groups, dropout, autocast and batch;
they alternate in rounds so that noise from the machine reaches both.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import report, setup  # noqa: E402

from invcache.data import parse_size  # noqa: E402
from invcache.data.detection import collate  # noqa: E402
from invcache.data.preprocess import normalize  # noqa: E402
from invcache.settings import DetrTrainSettings  # noqa: E402
from invcache.training import detr as trainer  # noqa: E402


def timed(step, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` calls of ``step``, the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="detr-r50")
    parser.add_argument("--size", default="480x640")
    parser.add_argument("--batch-size", type=int, default=2, help="Images per step (the official recipe: 2).")
    parser.add_argument("--steps", type=int, default=10, help="Steps per round and side.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup(args.threads)
    size, device = parse_size(args.size), torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        settings = DetrTrainSettings(model=args.model, source="synthetic", workspace=tmp, split="bench",
                                     synthetic_images=args.batch_size, val_split="bench",
                                     synthetic_val_images=args.batch_size, size=size, batch_size=args.batch_size,
                                     device=args.device, num_workers=0, out=Path(tmp) / "run")
        run = trainer.prepare(settings)
        batch = collate([run.train_data[i] for i in range(args.batch_size)])
    images = batch["input"].to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]

    plain_model = copy.deepcopy(run.model)
    plain_optimizer = torch.optim.AdamW(trainer.parameter_groups(plain_model, settings.lr_backbone), lr=settings.lr,
                                        weight_decay=settings.weight_decay)
    plain_parameters = [p for group in plain_optimizer.param_groups for p in group["params"]]

    def as_float(predictions: dict) -> dict:
        return {"pred_logits": predictions["pred_logits"].float(), "pred_boxes": predictions["pred_boxes"].float()}

    def plain_step() -> None:
        with torch.autocast(device.type, dtype=run.amp, enabled=run.amp is not None):
            outputs = plain_model.detection_outputs(normalize(images))
        outputs = {**as_float(outputs), "aux_outputs": [as_float(aux) for aux in outputs["aux_outputs"]]}
        loss = run.criterion.total(run.criterion(outputs, targets))
        plain_optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain_parameters, settings.clip_max_norm)
        plain_optimizer.step()

    def trainer_step() -> None:
        trainer.train_step(run.trainee, run.criterion, run.optimizer, run.scaler, images, targets, run.amp,
                           settings.clip_max_norm)

    seconds = {"trainer": 0.0, "plain": 0.0}
    with trainer.dropout(run.model, settings.dropout), trainer.dropout(plain_model, settings.dropout):
        timed(trainer_step, 2, device)  # warm-up: kernels chosen, optimizer state allocated
        timed(plain_step, 2, device)
        for _ in range(args.rounds):
            seconds["trainer"] += timed(trainer_step, args.steps, device)
            seconds["plain"] += timed(plain_step, args.steps, device)
    total = args.steps * args.rounds
    trainer_rate, plain_rate = total / seconds["trainer"], total / seconds["plain"]
    report("detr_train", model=args.model, size=args.size, batch_size=args.batch_size, device=str(device),
           amp=str(run.amp), steps=total, trainer_steps_s=round(trainer_rate, 3), plain_steps_s=round(plain_rate, 3),
           ratio=round(trainer_rate / plain_rate, 3), target=0.9)


if __name__ == "__main__":
    main()
