"""Named DETR configurations and the tap shapes they produce."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from invcache import taps as tapnames
from invcache.errors import UsageError


@dataclass(frozen=True)
class DetrConfig:
    name: str
    backbone: str  # a torchvision ResNet constructor name
    dilation: bool = False  # DC5: the last stage uses dilation instead of stride
    d_model: int = 256
    nhead: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    num_queries: int = 100
    num_classes: int = 91  # COCO ids 1..90 plus the unused 0 slot; logits add the no-object class

    @property
    def backbone_channels(self) -> int:
        return 512 if self.backbone in ("resnet18", "resnet34") else 2048

    @property
    def stride(self) -> int:
        return 16 if self.dilation else 32

    def feature_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the backbone feature map for an input of (H, W): each stride-2 stage rounds up."""
        h, w = size
        for _ in range(self.stride.bit_length() - 1):
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w

    def taps(self) -> list[str]:
        return tapnames.all_taps(self.num_encoder_layers, self.num_decoder_layers)

    def select_taps(self, spec: str) -> list[str]:
        return tapnames.select_taps(spec, self.num_encoder_layers, self.num_decoder_layers)

    def tap_shape(self, tap: str, size: tuple[int, int]) -> tuple[int, ...]:
        """Per-image shape of a tap (without the batch dimension) for input size (H, W)."""
        h, w = self.feature_size(size)
        tokens = h * w
        if tap == tapnames.INPUT:
            return (size[0], size[1], 3)
        if tap == tapnames.BACKBONE_C5:
            return (tokens, self.backbone_channels)
        if tap == tapnames.HEAD_LOGITS:
            return (self.num_queries, self.num_classes + 1)
        if tap == tapnames.HEAD_BOXES:
            return (self.num_queries, 4)
        stage, k = tap.partition(".")[0], tapnames.layer_index(tap)
        if stage == "enc" and k is not None and k <= self.num_encoder_layers:
            return (tokens, self.d_model)
        if stage == "dec" and k is not None and k <= self.num_decoder_layers:
            return (self.num_queries, self.d_model)
        raise UsageError(f"unknown tap {tap!r}; valid taps: {', '.join(self.taps())}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CONFIGS: dict[str, DetrConfig] = {
    "detr-r50": DetrConfig("detr-r50", "resnet50"),
    "detr-r50-dc5": DetrConfig("detr-r50-dc5", "resnet50", dilation=True),
    "detr-r101": DetrConfig("detr-r101", "resnet101"),
    "detr-r101-dc5": DetrConfig("detr-r101-dc5", "resnet101", dilation=True),
    # Not a published model: small enough for tests and the demo on two CPU cores. 10 queries, not 100:
    # a synthetic image holds at most 4 objects, and trained from random weights 100 queries never
    # learned to classify in the time tried, while 10 did within a few epochs (docs/training.md).
    "detr-tiny": DetrConfig(
        "detr-tiny", "resnet18", d_model=64, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
        dim_feedforward=256, num_queries=10,
    ),
}


def get_config(name: str) -> DetrConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(CONFIGS)}") from None
