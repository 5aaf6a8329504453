"""The inverse modules of SPEC §4 and what each maps: one registry, built from a cache's provenance."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from invcache import taps as T
from invcache.data.preprocess import normalize_unit, unit_images
from invcache.errors import UsageError
from invcache.inverse.backbone import BackboneInverse
from invcache.inverse.decoder import DecoderInverse
from invcache.inverse.encoder import EncoderInverse
from invcache.inverse.head import CLASS_INPUTS, HeadInverse
from invcache.models.config import DetrConfig

NAMES = ("backbone-inv", "encoder-inv", "decoder-inv", "head-inv")
LEARNING_RATES = {"backbone-inv": 3e-3, "encoder-inv": 1e-3, "decoder-inv": 1e-4, "head-inv": 1e-3}


@dataclass
class InverseSpec:
    """Everything needed to rebuild a module: its kind, the taps it reads and predicts, and its constructor."""

    name: str
    inputs: list[str]
    target: str
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def model_config(cache_attrs: dict) -> DetrConfig:
    return DetrConfig(**cache_attrs["model"]["config"])


def make_spec(
    name: str, cache_attrs: dict, *, from_tap: str | None = None, width: str = "full", class_input: str = "onehot"
) -> InverseSpec:
    """The spec of module ``name`` for caches like this one; ``from_tap`` picks another input tap (``--from``)."""
    if name not in NAMES:
        raise UsageError(f"unknown module {name!r}; choose one of: {', '.join(NAMES)}")
    cfg = model_config(cache_attrs)
    size = tuple(cache_attrs["preprocessing"]["size"])
    feature = cfg.feature_size(size)
    enc_last, dec_last = T.enc(cfg.num_encoder_layers), T.dec(cfg.num_decoder_layers)
    if name == "head-inv":
        if from_tap is not None:
            raise UsageError("head-inv reads head.logits and head.boxes; --from does not apply")
        if class_input not in CLASS_INPUTS:
            raise UsageError(f"bad --class-input {class_input!r}; choose one of: {', '.join(CLASS_INPUTS)}")
        return InverseSpec(name, [T.HEAD_LOGITS, T.HEAD_BOXES], dec_last, {
            "num_logits": cfg.num_classes + 1, "d_model": cfg.d_model, "class_input": class_input})
    defaults = {"backbone-inv": T.enc(0), "encoder-inv": enc_last, "decoder-inv": dec_last}
    from_tap = from_tap or defaults[name]
    allowed = {
        "backbone-inv": [T.enc(k) for k in range(cfg.num_encoder_layers + 1)],
        "encoder-inv": [T.enc(k) for k in range(1, cfg.num_encoder_layers + 1)],
        "decoder-inv": [T.dec(k) for k in range(cfg.num_decoder_layers + 1)],
    }[name]
    if from_tap not in allowed:
        raise UsageError(f"{name} cannot read {from_tap!r}; --from takes one of: {', '.join(allowed)}")
    transformer = {"d_model": cfg.d_model, "nhead": cfg.nhead, "dim_feedforward": cfg.dim_feedforward,
                   "feature_size": list(feature)}
    if name == "backbone-inv":
        if width not in ("full", "small"):
            raise UsageError(f"bad --width {width!r}; choose full or small")
        return InverseSpec(name, [from_tap], T.INPUT, {"in_channels": cfg.d_model, "feature_size": list(feature),
                                                     "width": width, "upsamplings": cfg.stride.bit_length() - 1})
    if name == "encoder-inv":
        return InverseSpec(name, [from_tap], T.enc(0), {**transformer, "num_layers": cfg.num_encoder_layers})
    return InverseSpec(name, [from_tap], enc_last, {**transformer, "num_layers": cfg.num_decoder_layers,
                                                  "num_queries": cfg.num_queries})


def build_inverse(spec: InverseSpec) -> nn.Module:
    kinds = {"backbone-inv": BackboneInverse, "encoder-inv": EncoderInverse, "decoder-inv": DecoderInverse,
             "head-inv": HeadInverse}
    config = {k: tuple(v) if k == "feature_size" else v for k, v in spec.config.items()}
    return kinds[spec.name](**config)


def run_inverse(spec: InverseSpec, module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The module's prediction from a batch holding its input taps (cast to float on the device)."""
    inputs = [batch[t].float() for t in spec.inputs]
    return module(*inputs)


def inverse_loss(spec: InverseSpec, prediction: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """MSE against the previous stage's embedding; for B⁻¹, in normalized image space."""
    if spec.target == T.INPUT:
        target = normalize_unit(unit_images(batch[T.INPUT]))
        return nn.functional.mse_loss(normalize_unit(prediction.float()), target)
    return nn.functional.mse_loss(prediction.float(), batch[spec.target].float())


__all__ = [
    "LEARNING_RATES", "NAMES", "InverseSpec", "build_inverse", "inverse_loss", "make_spec", "run_inverse",
]
