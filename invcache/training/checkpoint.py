"""Inverse-module checkpoints: safetensors weights + a JSON file (module spec, training settings, cache fingerprint).

``<dir>/last.*`` also holds the optimizer state and the epoch, so training resumes;
``<dir>/best.*`` is the module with the lowest validation loss. The cache fingerprint is
what a module must share with any cache it is chained with or evaluated on: the DETR that
made the cache (config and weights) and the preprocessing (``invcache.cache.provenance``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from invcache.cache.provenance import PAIRING_KEYS, differences, pairing_differences, pairing_fingerprint
from invcache.errors import InvcacheError, UsageError
from invcache.inverse import NAMES, InverseSpec, build_inverse, make_spec
from invcache.models.config import CONFIGS

# The largest image side a checkpoint's fingerprint may record: the inverse modules' position
# encodings grow with the feature map, so an edited size must not allocate without bound.
MAX_SIDE = 8192
SPEC_KEYS = frozenset(("name", "inputs", "target", "config"))


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
    """(module, meta, tensors) of a checkpoint, each part checked before anything is built from it.

    The JSON's spec must be the one :func:`invcache.inverse.make_spec` gives for the cache
    fingerprint the JSON records (a known DETR with its exact config, an image size of at most
    :data:`MAX_SIDE`), so an edited file cannot make us allocate a module of any size; the
    weights' names and shapes must be the module's before they are loaded. Any failure is one
    InvcacheError naming the file.
    """
    directory = Path(directory)
    meta_path, weights_path = directory / f"{stem}.json", directory / f"{stem}.safetensors"
    if not meta_path.is_file() or not weights_path.is_file():
        raise InvcacheError(f"no checkpoint {stem} in {directory} (expected {meta_path.name} and {weights_path.name})")
    meta = _read_meta(meta_path)
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            stamp = (f.metadata() or {}).get("epoch")
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("module.")}
    except SafetensorError as exc:
        raise InvcacheError(f"{weights_path} is not a safetensors file ({exc})") from None
    if stamp != str(meta.get("epoch")):
        raise InvcacheError(f"{directory}: {weights_path.name} (epoch {stamp}) and {meta_path.name} (epoch "
                            f"{meta.get('epoch')}) do not belong together; a save was interrupted — "
                            "rerun with --resume from an intact copy or start the run anew")
    spec = _checked_spec(meta, meta_path)
    module = build_inverse(spec)
    expected = {f"module.{k}": tuple(v.shape) for k, v in module.state_dict().items()}
    if shapes != expected:
        raise InvcacheError(f"{weights_path} does not hold the weights of the {spec.name} its {meta_path.name} "
                            f"describes ({_shape_differences(expected, shapes)})")
    try:
        tensors = load_file(str(weights_path), device=map_location)
    except SafetensorError as exc:
        raise InvcacheError(f"{weights_path} cannot be read ({exc})") from None
    state = {k.removeprefix("module."): v for k, v in tensors.items() if k.startswith("module.")}
    module.load_state_dict(state, strict=True)
    return module, meta, tensors


def load_optimizer_state(optimizer: torch.optim.Optimizer, meta: dict, tensors: dict, where: Path) -> None:
    """Restore the optimizer state :func:`save` wrote into ``optimizer``.

    State that does not fit it is one InvcacheError naming ``where``, checked here because torch
    would take mismatched groups or tensors and fail at the next step, mid-epoch, with a traceback.
    """
    fresh = optimizer.state_dict()["param_groups"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if not key.startswith("optimizer."):
            continue
        parts = key.split(".", 2)
        if len(parts) != 3 or not parts[1].isdecimal() or int(parts[1]) >= len(params) or not parts[2]:
            raise InvcacheError(f"{where}: its optimizer state holds {key!r}, which names no parameter")
        index, name = int(parts[1]), parts[2]
        if value.dim() and value.shape != params[index].shape:
            raise InvcacheError(f"{where}: its optimizer state {key} has the shape {tuple(value.shape)}, not the "
                                f"parameter's {tuple(params[index].shape)}")
        state.setdefault(index, {})[name] = value
    groups = meta.get("optimizer_param_groups")
    problem = _param_groups_problem(groups, fresh)
    if problem:
        raise InvcacheError(f"{where}: its {problem}")
    # A key this torch has and the file lacks (saved by another version) keeps this torch's default.
    groups = [{**default, **saved} for default, saved in zip(fresh, groups)]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise InvcacheError(f"{where}: its optimizer state does not fit the optimizer ({exc})") from None


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
        raise InvcacheError(f"{path} is not a checkpoint's JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict):
        raise InvcacheError(f"{path} is not a checkpoint's JSON (a JSON {type(meta).__name__}, not an object)")
    return meta


def _checked_spec(meta: dict, where: Path) -> InverseSpec:
    problem = _spec_problem(meta.get("spec"), meta.get("cache"))
    if problem:
        raise InvcacheError(f"{where}: {problem}; it is not a checkpoint as invcache writes it")
    return InverseSpec(**meta["spec"])


def _spec_problem(spec: object, fingerprint: object) -> str | None:
    """Why ``spec`` is not exactly what :func:`make_spec` gives for the cache ``fingerprint``, if it is not."""
    if not isinstance(spec, dict):
        return 'no module spec ("spec")'
    if set(spec) != SPEC_KEYS:
        return f"its spec has the keys {', '.join(sorted(spec))}, not {', '.join(sorted(SPEC_KEYS))}"
    if spec["name"] not in NAMES:
        return f"unknown module {spec['name']!r} (known: {', '.join(NAMES)})"
    inputs, config = spec["inputs"], spec["config"]
    if not (isinstance(inputs, list) and inputs and all(isinstance(t, str) for t in inputs)):
        return f"its spec's inputs {inputs!r} are not a list of tap names"
    if not isinstance(config, dict):
        return f"its spec's config is a JSON {type(config).__name__}, not an object"
    problem = _fingerprint_problem(fingerprint)
    if problem:
        return problem
    try:
        expected = make_spec(spec["name"], fingerprint, from_tap=None if spec["name"] == "head-inv" else inputs[0],
                             width=config.get("width", "full"), class_input=config.get("class_input", "onehot"))
    except UsageError as exc:
        return f"its spec is not one invcache makes ({exc})"
    diffs = differences(expected.to_dict(), spec, tuple(sorted(SPEC_KEYS)))
    if diffs:
        return (f"its spec is not the {spec['name']} of {fingerprint['model']['name']} caches of size "
                f"{fingerprint['preprocessing']['size']} ({'; '.join(diffs)}, expected -> found)")
    return None


def _fingerprint_problem(fingerprint: object) -> str | None:
    """Why the recorded cache fingerprint cannot be the one of a cache invcache made, if it cannot."""
    if not isinstance(fingerprint, dict) or not all(isinstance(fingerprint.get(k), dict) for k in PAIRING_KEYS):
        return 'no cache fingerprint ("cache" with "model" and "preprocessing")'
    model = fingerprint["model"]
    name = model.get("name")
    if not isinstance(name, str) or name not in CONFIGS:
        return f"its cache fingerprint names the unknown DETR {name!r} (known: {', '.join(CONFIGS)})"
    # Caches are only made by the named configs, so any other config is an edit, and would size the module.
    if model.get("config") != CONFIGS[name].to_dict():
        return f"its cache fingerprint holds a config that is not {name}'s"
    size = fingerprint["preprocessing"].get("size")
    if not (isinstance(size, list) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_SIDE for v in size)):
        return f"its cache fingerprint's image size {size!r} is not [height, width] of 1 to {MAX_SIDE} pixels"
    return None


def _shape_differences(expected: dict[str, tuple], found: dict[str, tuple]) -> str:
    missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    parts = [f"missing {_some(missing)}" if missing else "", f"unexpected {_some(extra)}" if extra else "",
             "; ".join(f"{k} is {found[k]}, not {expected[k]}" for k in wrong[:3])]
    return "; ".join(p for p in parts if p)


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _param_groups_problem(groups: object, fresh: list[dict]) -> str | None:
    """Why the saved ``optimizer_param_groups`` do not fit an optimizer whose groups are ``fresh``, if they do not."""
    if not isinstance(groups, list) or len(groups) != len(fresh):
        return f"optimizer_param_groups are not a list of {len(fresh)} group(s)"
    for i, (saved, default) in enumerate(zip(groups, fresh)):
        where = f"optimizer_param_groups[{i}]"
        if not isinstance(saved, dict):
            return f"{where} is not an object"
        if saved.get("params") != default["params"]:
            return (f"{where} holds the parameters {saved.get('params')!r}, not the {len(default['params'])} of the "
                    "module")
        for key in (saved.keys() & default.keys()) - {"params"}:
            if not _same_kind(saved[key], default[key]):
                return f"{where} has {key} {saved[key]!r}, which is not a {type(default[key]).__name__}"
    return None


def _same_kind(saved: object, default: object) -> bool:
    """Whether a JSON value can stand for an optimizer hyperparameter whose default is ``default``."""
    if default is None or isinstance(default, bool):
        return saved is None or isinstance(saved, bool)  # foreach / fused: None means "let torch pick"
    if isinstance(default, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool) and math.isfinite(saved)
    if isinstance(default, (tuple, list)):
        return (isinstance(saved, list) and len(saved) == len(default)
                and all(_same_kind(s, d) for s, d in zip(saved, default)))
    return isinstance(saved, type(default))
