"""The inverse modules' shapes and sizes for every DETR config."""

import pytest
import torch

from invcache.inverse import build_inverse, make_spec
from invcache.models import CONFIGS

SIZE = (64, 96)


def attrs_for(name: str) -> dict:
    return {"model": {"config": CONFIGS[name].to_dict()}, "preprocessing": {"size": list(SIZE)}}


@pytest.mark.parametrize("config", ["detr-r50", "detr-r50-dc5", "detr-tiny"])
@pytest.mark.parametrize("name", ["backbone-inv", "encoder-inv", "decoder-inv", "head-inv"])
def test_modules_map_their_input_shape_to_their_target_shape(config, name):
    cfg = CONFIGS[config]
    spec = make_spec(name, attrs_for(config), width="small")
    module = build_inverse(spec).eval()
    inputs = [torch.randn(2, *cfg.tap_shape(t, SIZE)) for t in spec.inputs]
    target = (3, *SIZE) if spec.target == "input" else cfg.tap_shape(spec.target, SIZE)
    with torch.no_grad():
        assert tuple(module(*inputs).shape) == (2, *target)


def test_full_width_backbone_inverse_has_the_authors_size():
    module = build_inverse(make_spec("backbone-inv", attrs_for("detr-r50")))
    assert 78e6 < sum(p.numel() for p in module.parameters()) < 80e6


def test_head_inverse_one_hot_ignores_everything_but_the_argmax():
    module = build_inverse(make_spec("head-inv", attrs_for("detr-tiny"))).eval()
    logits, boxes = torch.randn(1, 10, 92), torch.rand(1, 10, 4)
    shifted = logits + 0.01 * torch.randn_like(logits)
    shifted[logits.argmax(-1, keepdim=True) == torch.arange(92)] += 1.0  # keep every argmax
    assert torch.equal(module(logits, boxes), module(shifted, boxes))
    scores = build_inverse(make_spec("head-inv", attrs_for("detr-tiny"), class_input="scores")).eval()
    assert not torch.equal(scores(logits, boxes), scores(shifted, boxes))
