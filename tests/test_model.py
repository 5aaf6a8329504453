import pytest
import torch

from invcache import build_detr
from invcache.forward import forward_taps
from invcache.models import CONFIGS


@pytest.fixture(scope="module")
def tiny():
    return build_detr("detr-tiny", "random:0")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_config_produces_the_spec_shapes(name):
    model = build_detr(name, "random:0")
    size = (64, 96)
    taps = [t for t in model.config.select_taps("all,backbone.c5") if t != "input"]
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size), taps)
    assert list(out) == taps
    for tap, tensor in out.items():
        assert tuple(tensor.shape) == (2, *model.config.tap_shape(tap, size)), tap


def test_forward_stops_after_the_last_requested_tap(tiny, monkeypatch):
    calls = []
    for i, layer in enumerate(tiny.transformer.encoder.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.append(f"enc{i + 1}"))
    for i, layer in enumerate(tiny.transformer.decoder.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.append(f"dec{i + 1}"))
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        tiny(images, ["enc.1"])
        assert calls == ["enc1"]
        calls.clear()
        tiny(images, ["backbone.c5"])
        assert calls == []
        tiny(images, ["dec.1"])
        assert calls == ["enc1", "enc2", "dec1"]
        calls.clear()
        out = tiny(images, ["head.boxes"])
        assert calls == ["enc1", "enc2", "dec1", "dec2"] and list(out) == ["head.boxes"]


def test_partial_passes_agree_with_the_full_pass(tiny):
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        full = tiny(images, tiny.config.select_taps("all")[1:])
        for tap in ("enc.1", "dec.1", "head.logits"):
            assert torch.equal(tiny(images, [tap])[tap], full[tap])


def test_input_is_not_a_model_tap(tiny):
    with pytest.raises(ValueError, match="input"):
        tiny(torch.randn(1, 3, 64, 64), ["input"])


def test_forward_taps_returns_the_uint8_batch_and_runs_under_autocast(tiny):
    images = torch.randint(0, 256, (2, 64, 96, 3), dtype=torch.uint8)
    out = forward_taps(tiny, images, ["input", "enc.2", "head.boxes"], amp=torch.bfloat16)
    assert list(out) == ["input", "enc.2", "head.boxes"]
    assert torch.equal(out["input"], images)
    full = forward_taps(tiny, images, ["enc.2"])
    assert (out["enc.2"].float() - full["enc.2"]).abs().mean() < 0.05


def test_random_weights_are_deterministic_and_seeded():
    a, b, c = (build_detr("detr-tiny", w) for w in ("random:7", "random:7", "random:8"))
    assert a.fingerprint["weights_sha256"] == b.fingerprint["weights_sha256"]
    assert a.fingerprint["weights_sha256"] != c.fingerprint["weights_sha256"]
    assert a.fingerprint["config"]["d_model"] == 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tiny, monkeypatch):
    # TF32 convolutions (cuDNN's default) round to 10 mantissa bits; exactness is checked in full fp32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    images = torch.randint(0, 256, (2, 64, 96, 3), dtype=torch.uint8)
    cpu = forward_taps(tiny, images, ["head.logits"])
    gpu = forward_taps(build_detr("detr-tiny", "random:0", device="cuda"), images, ["head.logits"], amp=None)
    assert (gpu["head.logits"].cpu() - cpu["head.logits"]).abs().max() < 1e-3
    bf16 = forward_taps(build_detr("detr-tiny", "random:0", device="cuda"), images, ["head.logits"], torch.bfloat16)
    assert (bf16["head.logits"].float().cpu() - cpu["head.logits"]).abs().mean() < 0.05
