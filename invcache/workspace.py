"""The workspace under ``--root`` (SPEC §3): where caches, modules and analyses live, defined once.

```
<root>/cache/<split>/        a zarr cache (train2017, val2017, or any name)
<root>/cache/<split>+<label>/  a cache of perturbed images derived from it (``analyze grayscale``, ``analyze color``)
<root>/modules/<name>/       an inverse module's checkpoints (best.*, last.*, metrics.jsonl)
<root>/analysis/<name>/      an analysis' results, CSVs and figures
<root>/detr/<model>/         a run of ``invcache train detr`` (best.safetensors, last.pth, metrics.jsonl)
<root>/synthetic-coco/       the generated COCO-format dataset of ``--source synthetic``
```

The product card's commands chain without flags because every command finds its inputs
here: ``train`` reads ``cache/train2017`` (validating on ``cache/val2017``), ``analyze``
reads ``cache/val2017`` and ``modules/*``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT_ENV = "INVCACHE_ROOT"
DEFAULT_ROOT = "./invcache-runs"
TRAIN_SPLIT = "train2017"
VAL_SPLIT = "val2017"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike | None = None) -> Workspace:
        """The workspace at ``root``, else ``$INVCACHE_ROOT``, else ``./invcache-runs``."""
        return cls(Path(root if root is not None else os.environ.get(ROOT_ENV, DEFAULT_ROOT)))

    def cache(self, split: str) -> Path:
        return self.root / "cache" / split

    @property
    def modules(self) -> Path:
        return self.root / "modules"

    def module(self, name: str) -> Path:
        return self.modules / name

    def analysis(self, name: str) -> Path:
        return self.root / "analysis" / name

    def detr(self, model: str) -> Path:
        """Where ``invcache train detr`` trains ``model``: beside the inverse modules, not among them."""
        return self.root / "detr" / model

    @property
    def synthetic_coco(self) -> Path:
        return self.root / "synthetic-coco"


def derived_cache(location: str | os.PathLike, label: str) -> Path:
    """Where the cache of perturbed images ``label`` made from the cache at ``location`` lives: beside it, as
    ``<name>+<label>`` (``cache/val2017`` → ``cache/val2017+grayscale``), so every workspace command lists it."""
    path = Path(location)
    return path.with_name(f"{path.name}+{label}")
