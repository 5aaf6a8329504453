"""The Hungarian matcher's share of a DETR training step (target ≤ 10% on CPU).

One step is what the ``tradeoff`` fine-tuning does for the detection loss: the forward with
every decoder layer's predictions, ``SetCriterion`` (one matching per decoder layer), the
backward, gradient clipping at 0.1 and an AdamW step (the official DETR's settings). The
matcher's calls inside those steps are timed on their own; the share is their time over the
steps' time. Every image has ``--targets`` random boxes, the model ``--queries`` queries (100, the
published models'; detr-tiny itself has 10).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import report, setup  # noqa: E402

from invcache.data import parse_size  # noqa: E402
from invcache.models import DETR, get_config  # noqa: E402
from invcache.models.loss import SetCriterion  # noqa: E402
from invcache.models.matcher import HungarianMatcher  # noqa: E402
from invcache.models.weights import randomize  # noqa: E402


class TimedMatcher(HungarianMatcher):
    """The matcher, adding each call's wall time to ``seconds``.

    On a GPU it first waits for the forward's pending kernels, which its copy of the costs
    to the host would otherwise wait for inside the timed span.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0

    def forward(self, outputs, targets):
        if outputs["pred_logits"].is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        matches = super().forward(outputs, targets)
        self.seconds += time.perf_counter() - started
        return matches


def random_targets(batch: int, count: int, classes: int, device: torch.device, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(1, classes, (count,), generator=g).to(device),
             "boxes": torch.cat([torch.rand(count, 2, generator=g) * 0.6 + 0.2,
                                 torch.rand(count, 2, generator=g) * 0.3 + 0.05], dim=1).to(device)}
            for _ in range(batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="detr-tiny")
    parser.add_argument("--size", default="128x160")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--targets", type=int, default=20, help="Objects per image.")
    parser.add_argument("--queries", type=int, default=100, help="Object queries (the model's own config otherwise).")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup(args.threads)
    size, device = parse_size(args.size), torch.device(args.device)

    model = DETR(dataclasses.replace(get_config(args.model), num_queries=args.queries))
    randomize(model, 0)
    model = model.to(device).requires_grad_(True).train()
    matcher = TimedMatcher()
    criterion = SetCriterion(model.config.num_classes, matcher).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    images = torch.randn(args.batch_size, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    targets = random_targets(args.batch_size, args.targets, model.config.num_classes, device, seed=1)

    def step() -> None:
        total = criterion.total(criterion(model.detection_outputs(images), targets))
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    step_times, matcher_times = [], []
    for _ in range(args.steps):
        matcher.seconds = 0.0
        started = time.perf_counter()
        step()
        step_times.append(time.perf_counter() - started)
        matcher_times.append(matcher.seconds)
    step_s, matcher_s = statistics.median(step_times), statistics.median(matcher_times)
    report("detr_loss", model=args.model, size=args.size, batch_size=args.batch_size, device=str(device),
           queries=model.config.num_queries, targets_per_image=args.targets,
           matchings_per_step=model.config.num_decoder_layers, step_ms=round(step_s * 1e3, 2),
           matcher_ms=round(matcher_s * 1e3, 2), matcher_share=round(matcher_s / step_s, 4), target=0.10)


if __name__ == "__main__":
    main()
