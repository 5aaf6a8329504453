"""E⁻¹: the DETR encoder architecture, mapping a later encoder tap back to the encoder input."""

from __future__ import annotations

import torch
from torch import nn

from invcache.models.position import sine_position_encoding
from invcache.models.transformer import Encoder, xavier_init


class EncoderInverse(nn.Module):
    """Post-norm encoder layers (dropout 0) with DETR's sine position encoding added to queries and keys."""

    def __init__(self, d_model: int, nhead: int, num_layers: int, dim_feedforward: int,
                 feature_size: tuple[int, int]) -> None:
        super().__init__()
        self.encoder = Encoder(num_layers, d_model, nhead, dim_feedforward)
        xavier_init(self.encoder)
        self.register_buffer("pos", sine_position_encoding(*feature_size, d_model // 2), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens
        pos = self.pos.unsqueeze(0).to(x.dtype)
        for layer in self.encoder.layers:
            x = layer(x, pos)
        return x
