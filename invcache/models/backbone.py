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


def thaw_batch_norms(module: nn.Module) -> None:
    """Swap every frozen batch norm in ``module`` for a ``BatchNorm2d`` that starts from its statistics and
    affine transform, so training normalizes by batch statistics, learns the affine transform and updates
    the running statistics. What a backbone trained from random weights needs: frozen statistics suit only
    a backbone whose pretrained statistics match its data. :func:`freeze_batch_norms` undoes it."""
    for name, child in module.named_children():
        if isinstance(child, FrozenBatchNorm2d):
            norm = nn.BatchNorm2d(child.weight.numel(), eps=child.eps, device=child.weight.device)
            with torch.no_grad():
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(norm, key).copy_(getattr(child, key))
            # The official checkpoint layout has no batch counter; with a fixed momentum nothing reads it.
            norm.register_buffer("num_batches_tracked", None)
            setattr(module, name, norm.train(child.training))
        else:
            thaw_batch_norms(child)


def freeze_batch_norms(module: nn.Module) -> None:
    """Swap every ``BatchNorm2d`` in ``module`` back for a frozen batch norm holding its running statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps).to(child.weight.device)
            with torch.no_grad():
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, key).copy_(getattr(child, key))
            setattr(module, name, frozen)
        else:
            freeze_batch_norms(child)
