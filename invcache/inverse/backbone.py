"""B⁻¹: a transposed-convolution decoder from the backbone embedding (256×h×w) back to the image."""

from __future__ import annotations

import torch
from torch import nn

# The authors' widths; the ``small`` variant divides them by SMALL_DIVISOR for CPU runs.
WIDTHS = (2048, 1792, 1536, 1024, 512, 256, 128, 64)
SMALL_DIVISOR = 8


def _block(cin: int, cout: int, kernel: int, stride: int) -> list[nn.Module]:
    padding, output_padding = (kernel // 2, stride - 1)
    return [
        nn.ConvTranspose2d(cin, cout, kernel, stride=stride, padding=padding, output_padding=output_padding),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class BackboneInverse(nn.Module):
    """(B, T, C) tokens of an h×w feature map -> (B, 3, h·2^u, w·2^u) image in [0, 1].

    1×1 to the first width, two 3×3 stride-1 layers, ``upsamplings`` 3×3 stride-2 layers
    (five for DETR's stride 32, four for DC5's 16) and a final 3×3 to RGB, BatchNorm and
    ReLU between, sigmoid out (~79M parameters at full width, stride 32).
    """

    def __init__(self, in_channels: int, feature_size: tuple[int, int], width: str = "full",
                 upsamplings: int = 5) -> None:
        super().__init__()
        divisor = SMALL_DIVISOR if width == "small" else 1
        w = [max(c // divisor, 8) for c in WIDTHS]
        self.feature_size = tuple(feature_size)
        layers = _block(in_channels, w[0], 1, 1) + _block(w[0], w[1], 3, 1) + _block(w[1], w[2], 3, 1)
        for cin, cout in zip(w[2:2 + upsamplings], w[3:3 + upsamplings]):
            layers += _block(cin, cout, 3, 2)
        layers.append(nn.ConvTranspose2d(w[2 + upsamplings], 3, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, w = self.feature_size
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
        return torch.sigmoid(self.net(grid))
