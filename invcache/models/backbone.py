"""The ResNet trunk of DETR with frozen batch norm, laid out as in the official checkpoints."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d


class Backbone(nn.Module):
    """ResNet without its pooling and classifier; ``body`` holds the keys ``conv1``, ``bn1``, ``layer1``…``layer4``."""

    def __init__(self, name: str, dilation: bool) -> None:
        super().__init__()
        kwargs = {"replace_stride_with_dilation": [False, False, True]} if dilation else {}
        resnet = getattr(torchvision.models, name)(weights=None, norm_layer=FrozenBatchNorm2d, **kwargs)
        self.body = nn.Sequential(
            OrderedDict((n, m) for n, m in resnet.named_children() if n not in ("avgpool", "fc"))
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)
