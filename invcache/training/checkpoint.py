"""Inverse-module checkpoints: safetensors weights + a JSON file (module spec, training settings, cache fingerprint).

``<dir>/last.*`` also holds the optimizer state and the epoch, so training resumes;
``<dir>/best.*`` is the module with the lowest validation loss. The cache fingerprint is
what a module must share with any cache it is chained with or evaluated on: the DETR that
made the cache (config and weights) and the preprocessing (``invcache.cache.provenance``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from invcache.cache.provenance import pairing_differences, pairing_fingerprint
from invcache.errors import InvcacheError
from invcache.inverse import InverseSpec, build_inverse


def cache_fingerprint(cache_attrs: dict) -> dict:
    """What a module records of the cache it was trained on (what every cache it meets must share)."""
    return pairing_fingerprint(cache_attrs)


def check_compatible(fingerprint: dict, cache_attrs: dict, what: str, where: str) -> None:
    """Refuse to pair ``what`` (with ``fingerprint``) with ``where`` (a cache with ``cache_attrs``), naming why."""
    diffs = pairing_differences(fingerprint, cache_attrs)
    if diffs:
        raise InvcacheError(f"{what} does not belong with {where}: they come from another DETR or preprocessing "
                            f"({'; '.join(diffs)})")


def _write_atomic(path: Path, write) -> None:
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)


def save(directory: Path, stem: str, module: nn.Module, meta: dict,
         optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write ``<stem>.safetensors`` then ``<stem>.json`` (the JSON last: it marks the pair complete)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"module.{k}": v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    meta = dict(meta)
    if optimizer is not None:
        state = optimizer.state_dict()
        for index, values in state["state"].items():
            for name, value in values.items():
                tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().contiguous().cpu()
        meta["optimizer_param_groups"] = state["param_groups"]
    # The epoch in both files tells a matching pair from one torn by a kill between the two writes.
    stamp = {"epoch": str(meta.get("epoch"))}
    _write_atomic(directory / f"{stem}.safetensors", lambda p: save_file(tensors, str(p), metadata=stamp))
    _write_atomic(directory / f"{stem}.json", lambda p: p.write_text(json.dumps(meta, indent=1, default=str)))


def load(directory: str | os.PathLike, stem: str = "best", map_location: str = "cpu") -> tuple[nn.Module, dict, dict]:
    """(module, meta, tensors) of a checkpoint; the module is built from the stored spec and loaded strictly."""
    directory = Path(directory)
    meta_path, weights_path = directory / f"{stem}.json", directory / f"{stem}.safetensors"
    if not meta_path.is_file() or not weights_path.is_file():
        raise InvcacheError(f"no checkpoint {stem} in {directory} (expected {meta_path.name} and {weights_path.name})")
    meta = json.loads(meta_path.read_text())
    with safe_open(str(weights_path), framework="pt") as f:
        stamp = (f.metadata() or {}).get("epoch")
    if stamp != str(meta.get("epoch")):
        raise InvcacheError(f"{directory}: {weights_path.name} (epoch {stamp}) and {meta_path.name} (epoch "
                            f"{meta.get('epoch')}) do not belong together; a save was interrupted — "
                            "rerun with --resume from an intact copy or start the run anew")
    tensors = load_file(str(weights_path), device=map_location)
    module = build_inverse(InverseSpec(**meta["spec"]))
    state = {k.removeprefix("module."): v for k, v in tensors.items() if k.startswith("module.")}
    module.load_state_dict(state, strict=True)
    return module, meta, tensors


def load_optimizer_state(optimizer: torch.optim.Optimizer, meta: dict, tensors: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_param_groups"]})
