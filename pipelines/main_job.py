"""The main job, end to end, on the public API: caches → inverse modules → every analysis → one report.

1. ``extract`` train2017 and val2017 with every tap (resumes: complete shards are skipped);
2. ``train`` B⁻¹, E⁻¹, D⁻¹ and P⁻¹ (one-hot class input, and softmax scores for the onehot
   analysis), each resuming from its ``last`` checkpoint (a finished module is not retrained);
3. ``analyze`` stages, inter-layer, onehot and ap over every valid validation image, then the
   perturbation studies grayscale and color (each extracts its perturbed images once);
4. ``report``: one self-contained HTML page.

Every step is idempotent, so rerunning the recipe after an interruption finishes the job.
``demo.py`` runs it on the embedded default; ``paper.py`` with the paper's settings on COCO.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import invcache
from invcache.analysis import ap, color, grayscale, inter_layer, onehot, report, stages

# (module, settings beyond the defaults) in training order; `epochs` picks each module's epochs.
MODULES = [
    ("backbone-inv", {}),
    ("encoder-inv", {}),
    ("decoder-inv", {}),
    ("head-inv", {}),
    ("head-inv", {"class_input": "scores"}),
]


@dataclass
class MainJob:
    """What differs between the demo and the paper: data, model, sizes and training lengths."""

    root: str
    model: str = "detr-r50"
    weights: str = "official"
    size: tuple[int, int] = (480, 640)
    source: str = "coco"
    coco_root: str | None = None
    split_images: Mapping[str, int | None] = field(default_factory=lambda: {"train2017": None, "val2017": None})
    epochs: Mapping[str, int] = field(default_factory=lambda: {"backbone-inv": 100, "encoder-inv": 100,
                                                               "decoder-inv": 100, "head-inv": 100})
    batch_size: int = 128
    width: str = "full"
    shard_size: int = 256
    num_workers: int = 8
    analysis_batch_size: int = 64
    n: int = 8
    color_options: Mapping[str, object] = field(default_factory=dict)  # e.g. categories, min_area of `analyze color`

    def run(self, say: Callable[[str], None] = print) -> Path:
        """Run (or finish) the job; returns the report's path."""
        for split, images in self.split_images.items():
            started = time.perf_counter()
            result = invcache.extract(invcache.ExtractSettings(
                split=split, source=self.source, coco_root=self.coco_root, workspace=self.root,
                synthetic_images=images if self.source == "synthetic" else None,
                limit=images if self.source != "synthetic" else None, model=self.model, weights=self.weights,
                size=self.size, shard_size=self.shard_size, num_workers=self.num_workers))
            say(f"extract {split}: {result.shards_written} shard(s) written, {result.shards_skipped} already "
                f"complete ({time.perf_counter() - started:.1f} s) -> {result.cache}")
        for name, extra in MODULES:
            started = time.perf_counter()
            result = invcache.train(invcache.TrainSettings(
                name, workspace=self.root, epochs=self.epochs[name], batch_size=self.batch_size, resume=True,
                width=self.width, **extra))
            say(f"train {result.out.name}: {result.epochs} epochs, best validation loss {result.best_val_loss:.4f} "
                f"({time.perf_counter() - started:.1f} s)")
        settings = invcache.AnalyzeSettings(workspace=self.root, n=self.n, batch_size=self.analysis_batch_size)
        for analysis, options in ((stages, {}), (inter_layer, {}), (onehot, {}), (ap, {}), (grayscale, {}),
                                  (color, self.color_options)):
            started = time.perf_counter()
            results = analysis.run(settings, **options)
            figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in results["headline"].items())
            say(f"analyze {analysis.NAME} ({time.perf_counter() - started:.1f} s): {figures}")
        path = report.build_report(self.root)
        say(f"report: {path}")
        return path
