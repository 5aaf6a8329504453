"""Convert Hugging Face DETR checkpoints to the official facebookresearch/detr key layout.

Handles transformers 4.x files (``backbone.conv_encoder``, ``out_proj``, ``fc1``) and 5.x
state dicts (``backbone.model``, ``o_proj``, ``mlp.fc1``), with either backbone naming:
timm's (the same as torchvision's) or HF's own ResNet (``embedder``/``encoder.stages``).
Keys that match no rule pass through unchanged, so a strict load names them.
"""

from __future__ import annotations

import re

import torch

_BACKBONE_PREFIXES = ("model.backbone.conv_encoder.model.", "model.backbone.model.")
_ATTENTION = {"self_attn": "self_attn", "encoder_attn": "multihead_attn"}
_ENCODER_NORMS = {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2"}
_DECODER_NORMS = {"self_attn_layer_norm": "norm1", "encoder_attn_layer_norm": "norm2", "final_layer_norm": "norm3"}


def is_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(_BACKBONE_PREFIXES) or k.startswith("class_labels_classifier.") for k in state_dict)


def _hf_resnet_key(rest: str) -> str:
    """HF ResNet names -> torchvision names (``embedder.embedder.convolution`` -> ``conv1``)."""
    m = re.fullmatch(r"embedder\.embedder\.(convolution|normalization)\.(.+)", rest)
    if m:
        return ("conv1." if m[1] == "convolution" else "bn1.") + m[2]
    m = re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.(convolution|normalization)\.(.+)", rest)
    if m:
        return f"layer{int(m[1]) + 1}.{m[2]}.downsample.{0 if m[3] == 'convolution' else 1}.{m[4]}"
    m = re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.(convolution|normalization)\.(.+)", rest)
    if m:
        kind = "conv" if m[4] == "convolution" else "bn"
        return f"layer{int(m[1]) + 1}.{m[2]}.{kind}{int(m[3]) + 1}.{m[5]}"
    return rest


def _backbone_key(key: str) -> str | None:
    for prefix in _BACKBONE_PREFIXES:
        if key.startswith(prefix):
            return "backbone.0.body." + _hf_resnet_key(key[len(prefix):])
    return None


def _transformer_key(key: str) -> str | None:
    """Everything but the q/k/v projections, which are fused separately."""
    m = re.fullmatch(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)", key)
    if not m:
        return None
    stage, index, rest = m.groups()
    base = f"transformer.{stage}.layers.{index}."
    norms = _ENCODER_NORMS if stage == "encoder" else _DECODER_NORMS
    head, _, tail = rest.partition(".")
    if head in norms:
        return base + f"{norms[head]}.{tail}"
    m2 = re.fullmatch(r"(?:mlp\.)?fc([12])\.(weight|bias)", rest)
    if m2:
        return base + f"linear{m2[1]}.{m2[2]}"
    m2 = re.fullmatch(r"(self_attn|encoder_attn)\.(?:out_proj|o_proj)\.(weight|bias)", rest)
    if m2:
        return base + f"{_ATTENTION[m2[1]]}.out_proj.{m2[2]}"
    return None


_SIMPLE = {
    "model.input_projection.": "input_proj.",
    "model.query_position_embeddings.": "query_embed.",
    "model.decoder.layernorm.": "transformer.decoder.norm.",
    "class_labels_classifier.": "class_embed.",
    "bbox_predictor.": "bbox_embed.",
}
_QKV = re.compile(r"model\.(encoder|decoder)\.layers\.(\d+)\.(self_attn|encoder_attn)\.([qkv])_proj\.(weight|bias)")


def hf_to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted: dict[str, torch.Tensor] = {}
    qkv_groups: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in state_dict.items():
        if key.endswith(".num_batches_tracked"):
            continue
        qkv = _QKV.fullmatch(key)
        if qkv:
            stage, index, attn, which, param = qkv.groups()
            target = f"transformer.{stage}.layers.{index}.{_ATTENTION[attn]}.in_proj_{param}"
            qkv_groups.setdefault((target, param), {})[which] = (key, tensor)
            continue
        new = _backbone_key(key) or _transformer_key(key)
        if new is None:
            new = next((new_p + key[len(old):] for old, new_p in _SIMPLE.items() if key.startswith(old)), key)
        converted[new] = tensor
    for (target, _), parts in qkv_groups.items():
        if set(parts) == {"q", "k", "v"}:
            converted[target] = torch.cat([parts[w][1] for w in "qkv"], dim=0)
        else:
            converted.update({key: tensor for key, tensor in parts.values()})
    return converted
