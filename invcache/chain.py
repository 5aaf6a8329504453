"""Chains of inverse modules (SPEC §5): from a tensor of any layer back to pixels.

``load_modules(dir)`` loads the ``best`` checkpoint of each module under a modules folder
(``<root>/modules``); :func:`invert` applies a chain of them to tensors. The chain of a tap
is the one its stage needs (:func:`chain_for`); ``via`` names another, e.g. B⁻¹ applied
directly to ``enc.3`` as the inter-layer analysis does::

    modules = load_modules("invcache-runs/modules")
    images = invert(modules, {"enc.6": cache["enc.6"].torch[:8]})            # B⁻¹(E⁻¹(enc.6))
    images = invert(modules, {"enc.3": x}, via=("backbone-inv",))             # B⁻¹(enc.3)
    images = invert(modules, {"head.logits": logits, "head.boxes": boxes})    # the head chain
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from invcache import taps as T
from invcache.errors import InvcacheError, UsageError
from invcache.inverse import NAMES, InverseSpec
from invcache.training import checkpoint

STAGES = ("backbone", "encoder", "decoder", "head")
STAGE_CHAINS = {
    "backbone": ("backbone-inv",),
    "encoder": ("encoder-inv", "backbone-inv"),
    "decoder": ("decoder-inv", "encoder-inv", "backbone-inv"),
    "head": ("head-inv", "decoder-inv", "encoder-inv", "backbone-inv"),
}


@dataclass
class LoadedModule:
    """A trained inverse module in eval mode, with its spec and checkpoint metadata."""

    spec: InverseSpec
    module: torch.nn.Module
    meta: dict
    directory: Path


def stage_of(tap: str) -> str:
    """The stage whose chain inverts ``tap``: ``enc.0`` backbone, ``enc.k`` encoder, ``dec.k`` decoder, ``head.*``."""
    if tap == T.enc(0):
        return "backbone"
    if tap.startswith("enc."):
        return "encoder"
    if tap.startswith("dec."):
        return "decoder"
    if tap in (T.HEAD_LOGITS, T.HEAD_BOXES):
        return "head"
    raise UsageError(f"no inverse chain starts at {tap!r}; chains start at enc.*, dec.* or head.*")


def chain_for(tap: str) -> tuple[str, ...]:
    """The modules, first to last, that take ``tap`` back to pixels."""
    return STAGE_CHAINS[stage_of(tap)]


def load_modules(
    directory: str | os.PathLike,
    names: Iterable[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    cache_attrs: Mapping | None = None,
    cache_name: str = "the cache",
) -> dict[str, LoadedModule]:
    """The ``best`` checkpoint of each module in ``directory/<name>/`` (default: every one that exists).

    With ``cache_attrs`` (a cache's ``.attrs``), a module trained on caches of another DETR
    or preprocessing is refused, naming the difference.
    """
    directory = Path(directory)
    if names is None:
        names = [n for n in NAMES if (directory / n / "best.json").is_file()]
        if not names:
            raise InvcacheError(f"no trained modules in {directory} (expected {', '.join(NAMES)} folders with "
                                "best.json); run `invcache train NAME` first")
    loaded = {}
    for name in sorted(set(names)):
        folder = directory / name
        module, meta, _ = checkpoint.load(folder, "best")
        if cache_attrs is not None:
            checkpoint.check_compatible(meta["cache"], dict(cache_attrs), f"module {folder}", cache_name)
        loaded[name] = LoadedModule(InverseSpec(**meta["spec"]), module.to(device).eval(), meta, folder)
    return loaded


@torch.no_grad()
def invert(
    modules: Mapping[str, LoadedModule],
    inputs: Mapping[str, torch.Tensor],
    via: Sequence[str] | None = None,
) -> torch.Tensor:
    """Images in [0, 1], (B, 3, H, W), reconstructed from ``inputs`` (tap name -> batch-first tensor).

    The first module of the chain (``via``, else :func:`chain_for` of the input tap) reads
    the inputs; each later module reads its predecessor's output. A single input may come
    from another layer than the one the first module was trained on (``{"enc.3": x}``
    through an E⁻¹ trained on ``enc.6``): that is the per-layer question of the inter-layer
    analysis.
    """
    if not inputs:
        raise UsageError("invert needs at least one input tensor")
    names = tuple(via) if via is not None else chain_for(next(iter(inputs)))
    missing = [n for n in names if n not in modules]
    if missing:
        raise UsageError(f"the chain {' -> '.join(names)} needs {', '.join(missing)}, which is not loaded")
    first = modules[names[0]]
    if set(inputs) == set(first.spec.inputs):
        args = [inputs[t] for t in first.spec.inputs]
    elif len(inputs) == 1 and len(first.spec.inputs) == 1:
        args = list(inputs.values())
    else:
        raise UsageError(f"{names[0]} reads {', '.join(first.spec.inputs)}; got {', '.join(inputs)}")
    device = next(first.module.parameters()).device
    x = first.module(*(a.to(device).float() for a in args))
    for name in names[1:]:
        x = modules[name].module(x)
    return x.float()
