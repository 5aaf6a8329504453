"""Where DETR's weights come from: official checkpoints, HF checkpoints, the published files, the
weights shipped with invcache (:data:`EMBEDDED_WEIGHTS`), or a seed.

Checkpoints are read with ``torch.load(weights_only=True)`` or safetensors, never with
unrestricted pickle, and always loaded strictly.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from invcache.data.preprocess import normalize_unit
from invcache.errors import UsageError, WeightsError
from invcache.hashing import file_sha256
from invcache.models.config import DetrConfig
from invcache.models.detr import DETR
from invcache.models.hf_convert import hf_to_official, is_hf_state_dict

OFFICIAL_URL_BASE = "https://dl.fbaipublicfiles.com/detr/"
OFFICIAL_FILES = {
    "detr-r50": "detr-r50-e632da11.pth",
    "detr-r50-dc5": "detr-r50-dc5-f0fb7ef5.pth",
    "detr-r101": "detr-r101-2c7b67e5.pth",
    "detr-r101-dc5": "detr-r101-dc5-a2e86def.pth",
}
HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class EmbeddedWeights:
    """Weights shipped inside the package, loaded by name (``--weights NAME``).

    ``file`` lies in :data:`EMBEDDED_DIR`; its sha256 must be ``sha256``, so an altered or
    truncated file is refused rather than loaded; ``command`` is the one command that trains
    the file again (GPU training is not bit-exact from run to run: a retrained file is an
    equivalent one, committed with its new sha256).
    """

    model: str  # the named config the weights fit
    file: str
    sha256: str
    command: str


EMBEDDED_DIR = Path(__file__).parent / "embedded"
EMBEDDED_WEIGHTS: dict[str, EmbeddedWeights] = {
    # detr-tiny trained from random:0 on the synthetic shapes at 128x160 (docs/training.md, "The embedded default")
    "demo": EmbeddedWeights(
        "detr-tiny", "detr-tiny-demo.safetensors",
        "2fda581e4b2bf54c184e6c48f9273cd0902d4210b08696b62d25aeaed199b48f",
        "python pipelines/demo_detr.py (from a source checkout)",
    ),
}


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict in the official key layout from an official or HF checkpoint (file or HF folder)."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in HF_FILENAMES if (path / name).is_file()]
        if not found:
            raise WeightsError(f"{path}: no {' or '.join(HF_FILENAMES)} in this folder")
        path = found[0]
    if not path.is_file():
        raise WeightsError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for malformed files
            raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsError(
                f"{path}: refused to unpickle (only tensors and plain containers are allowed): {first}"
            ) from None
        except (RuntimeError, EOFError, OSError) as exc:
            raise WeightsError(f"{path}: not a readable torch checkpoint ({exc})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors (or {{'model': state_dict}})")
    return hf_to_official(state) if is_hf_state_dict(state) else state


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load every key or fail naming each missing, unexpected and misshapen key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshapen = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    problems = [
        f"{label}: {', '.join(items)}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", misshapen))
        if items
    ]
    if problems:
        name = getattr(getattr(model, "config", None), "name", type(model).__name__)
        raise WeightsError(f"{origin} does not fit {name}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


def official_checkpoint_path(config: DetrConfig) -> Path:
    """The published checkpoint of a config in torch.hub's cache, downloaded (with hash check) if absent."""
    filename = OFFICIAL_FILES.get(config.name)
    if filename is None:
        raise UsageError(
            f"no published weights for {config.name}; use --weights random[:SEED] or a checkpoint path"
            + (" (or demo: detr-tiny trained on the synthetic shapes)" if config.name == "detr-tiny" else "")
        )
    target = Path(torch.hub.get_dir()) / "checkpoints" / filename
    url = os.environ.get("INVCACHE_DETR_URL_BASE", OFFICIAL_URL_BASE) + filename
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(target), hash_prefix=None, progress=False)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            target.unlink(missing_ok=True)
            raise WeightsError(
                f"cannot download {filename} from {url} ({exc}); without a network, "
                f"put the file at {target} or pass its path with --weights"
            ) from None
    expected = filename.rsplit("-", 1)[1].split(".")[0]
    digest = file_sha256(target)
    if not digest.startswith(expected):
        raise WeightsError(
            f"{target}: sha256 {digest[:16]}… does not start with {expected} as the published file's does; "
            "delete it to download again"
        )
    return target


def randomize(model: DETR, seed: int) -> None:
    """The official DETR's initialization, drawn from ``seed``, then frozen batch-norm statistics
    calibrated on a fixed noise batch.

    As facebookresearch/detr initializes its model, except that the backbone is random instead of
    ImageNet's: torchvision's ResNet initialization (He-normal convolutions, unit batch norms),
    PyTorch's default for every other layer (the query embedding standard normal), then
    Xavier-uniform for every matrix of the transformer. One difference: the attention output
    projections' biases keep ``nn.Linear``'s uniform default, where the official model has 0
    (the embedded default was trained from this initialization, so it stays). (An earlier Xavier-uniform of every
    matrix, query embedding included, left the queries so alike that DETR trained from it did
    not learn to classify; docs/training.md.) Without calibration a random ResNet's activations
    grow block after block; calibrating each frozen BN on its own input keeps every stage at
    unit scale, as trained weights do. The caller's random state is left as it was.
    """
    from torchvision.ops import FrozenBatchNorm2d

    backbone = set(model.backbone.modules())
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.random.default_generator.manual_seed(seed)  # the CPU generator alone: torch.manual_seed would reseed CUDA
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, nn.Conv2d) and module in backbone:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.MultiheadAttention):
                module._reset_parameters()
            elif isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm)):
                module.reset_parameters()
        for parameter in model.transformer.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
        _calibrate_batch_norms(model, torch.Generator().manual_seed(seed))


def _calibrate_batch_norms(model: DETR, generator: torch.Generator) -> None:
    from torchvision.ops import FrozenBatchNorm2d

    hooks = []

    def calibrate(module, inputs):
        x = inputs[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))

    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            hooks.append(module.register_forward_pre_hook(calibrate))
    # One thread: convolutions split across threads sum in another order, and the statistics
    # (hence the weights' sha256, which caches record and compare) must not depend on the machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.backbone[0](_calibration_images(generator))
    finally:
        torch.set_num_threads(threads)
        for hook in hooks:
            hook.remove()


def _calibration_images(generator: torch.Generator) -> torch.Tensor:
    """Smooth colour fields with fine grain (image-like) next to white noise, normalized as images are.

    Both kinds are needed: statistics from either alone leave the other's activations
    hundreds of times too large.
    """
    coarse = torch.rand(2, 3, 4, 4, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(128, 160), mode="bilinear", align_corners=False)
    smooth = (smooth + 0.05 * torch.randn(2, 3, 128, 160, generator=generator)).clamp(0, 1)
    return torch.cat([normalize_unit(smooth), torch.randn(2, 3, 128, 160, generator=generator)])


def load_weights(model: DETR, weights: str) -> str:
    """Fill ``model`` from a ``--weights`` value; returns a description of the source."""
    if weights == "random" or weights.startswith("random:"):
        seed_text = weights.partition(":")[2] or "0"
        if not seed_text.isdigit():
            raise UsageError(f"bad --weights {weights!r}: the seed in random:SEED must be a non-negative integer")
        randomize(model, int(seed_text))
        return f"random:{int(seed_text)}"
    if weights == "official":
        path = official_checkpoint_path(model.config)
        load_state_dict_strict(model, read_checkpoint(path), str(path))
        return f"official:{path.name}"
    if weights in EMBEDDED_WEIGHTS:
        path = embedded_weights_path(weights, model.config)
        load_state_dict_strict(model, read_checkpoint(path), str(path))
        return weights
    path = Path(weights)
    if not path.exists():
        raise UsageError(f"bad --weights {weights!r}: not 'official', {_embedded_names()}'random[:SEED]' or an "
                         "existing path")
    load_state_dict_strict(model, read_checkpoint(path), str(path))
    return str(path.resolve())


def embedded_weights_path(name: str, config: DetrConfig) -> Path:
    """The file of the embedded weights ``name``, checked: it fits ``config`` and has its recorded sha256."""
    entry = EMBEDDED_WEIGHTS[name]
    if entry.model != config.name:
        raise UsageError(f"--weights {name} are {entry.model} weights, not {config.name}'s; use --model {entry.model}")
    path = EMBEDDED_DIR / entry.file
    if not path.is_file():
        raise WeightsError(f"the embedded weights {name!r} are missing ({path} is not there; the installed package is "
                           f"incomplete); reproduce them with: {entry.command}")
    digest = file_sha256(path)
    if digest != entry.sha256:
        raise WeightsError(f"the embedded weights {name!r} ({path}) have the sha256 {digest}, not the recorded "
                           f"{entry.sha256 or '(none recorded)'}: the file was altered; reinstall invcache or "
                           f"reproduce it with: {entry.command}")
    return path


def _embedded_names() -> str:
    return "".join(f"{name!r}, " for name in EMBEDDED_WEIGHTS)


def weights_sha256(model: nn.Module) -> str:
    """sha256 of the weights themselves (sorted keys, dtype, shape, bytes): the same for any file format."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
