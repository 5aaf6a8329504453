"""Every tap of our DETR equals HF transformers' DetrForObjectDetection with the same weights (SPEC §2)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from invcache import build_detr
from invcache.models.config import get_config

transformers = pytest.importorskip("transformers")

SIZE = (128, 160)


def hf_config(name: str):
    cfg = get_config(name)
    kwargs = dict(
        use_timm_backbone=False, use_pretrained_backbone=False, num_labels=91,
        d_model=cfg.d_model, encoder_layers=cfg.num_encoder_layers, decoder_layers=cfg.num_decoder_layers,
        encoder_attention_heads=cfg.nhead, decoder_attention_heads=cfg.nhead,
        encoder_ffn_dim=cfg.dim_feedforward, decoder_ffn_dim=cfg.dim_feedforward, num_queries=cfg.num_queries,
    )
    if cfg.backbone == "resnet18":
        kwargs["backbone_config"] = transformers.ResNetConfig(
            layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], out_features=["stage4"]
        )
    return transformers.DetrConfig(**kwargs)


def random_hf_detr(name: str, seed: int):
    """HF DETR with random weights, frozen batch-norm statistics and affines randomized too."""
    torch.manual_seed(seed)
    model = transformers.DetrForObjectDetection(hf_config(name)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if "normalization" in key and tensor.is_floating_point():
                if key.endswith("running_var"):
                    tensor.copy_(torch.rand(tensor.shape, generator=g) * 1.5 + 0.5)
                elif key.endswith("running_mean") or key.endswith("bias"):
                    tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.1)
                else:
                    tensor.copy_(torch.rand(tensor.shape, generator=g) * 0.5 + 0.5)
            elif "layer_norm" in key or "layernorm" in key:
                tensor.add_(torch.randn(tensor.shape, generator=g) * 0.1)
    return model


def hf_taps(model, images: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(pixel_values=images, output_hidden_states=True)
    layers = model.config.encoder_layers
    taps = {f"enc.{k}": h for k, h in enumerate(out.encoder_hidden_states)}
    norm = model.model.decoder.layernorm
    # HF records the zero queries, then each decoder layer's raw output, except that the last
    # entry is the final (normed) output; DETR's heads see every layer through that LayerNorm.
    decoder_raw = out.decoder_hidden_states[1:-1]
    assert len(taps) == layers + 1 and len(decoder_raw) == model.config.decoder_layers - 1
    with torch.no_grad():
        for k, h in enumerate(decoder_raw, start=1):
            taps[f"dec.{k}"] = norm(h)
    taps[f"dec.{model.config.decoder_layers}"] = out.last_hidden_state
    taps["head.logits"] = out.logits
    taps["head.boxes"] = out.pred_boxes
    return taps


def assert_taps_match(ours: dict, reference: dict, tol: float = 1e-4) -> None:
    assert set(reference) <= set(ours)
    for tap, ref in reference.items():
        diff = (ours[tap] - ref).abs().max().item()
        assert diff <= tol, f"{tap}: max abs difference {diff:.3g} > {tol}"


def legacy_hf_naming(state: dict[str, torch.Tensor], official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layout of published HF files (transformers 4.x, timm backbone names), built independently."""
    legacy = {}
    for key, tensor in state.items():
        if key.startswith("model.backbone."):
            continue
        key = key.replace(".o_proj.", ".out_proj.").replace(".mlp.fc", ".fc")
        legacy[key] = tensor
    for key, tensor in official.items():
        if key.startswith("backbone.0.body."):
            legacy["model.backbone.conv_encoder.model." + key.removeprefix("backbone.0.body.")] = tensor
    return legacy


@pytest.mark.parametrize("name", ["detr-r50", "detr-tiny"])
def test_every_tap_matches_hf_through_each_checkpoint_layout(name, tmp_path):
    hf = random_hf_detr(name, seed=3)
    images = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    reference = hf_taps(hf, images)

    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    via_hf = build_detr(name, str(tmp_path / "model.safetensors"))
    official = via_hf.state_dict()
    torch.save({"model": official}, tmp_path / "official.pth")
    torch.save(legacy_hf_naming(state, official), tmp_path / "legacy.bin")

    taps = [t for t in via_hf.config.taps() if t not in ("input", "backbone.c5")]
    fingerprints = set()
    for path in ("model.safetensors", "pytorch_model.bin", "official.pth", "legacy.bin"):
        model = build_detr(name, str(tmp_path / path))
        fingerprints.add(model.fingerprint["weights_sha256"])
        with torch.no_grad():
            ours = model(images, taps)
        assert_taps_match(ours, reference)
    assert len(fingerprints) == 1, "the same weights must give the same fingerprint in every file format"


def test_hf_folder_is_accepted(tmp_path):
    hf = random_hf_detr("detr-tiny", seed=5)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    model = build_detr("detr-tiny", str(tmp_path))
    images = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        ours = model(images, ["head.logits", "head.boxes"])
    reference = hf_taps(hf, images)
    assert_taps_match(ours, {k: reference[k] for k in ("head.logits", "head.boxes")})
