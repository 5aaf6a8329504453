"""D⁻¹: the DETR decoder architecture, mapping the decoder embeddings (one per query) back to the encoder embedding."""

from __future__ import annotations

import torch
from torch import nn

from invcache.models.position import sine_position_encoding
from invcache.models.transformer import Decoder, xavier_init


class DecoderInverse(nn.Module):
    """T zero-initialised image queries, positioned by the feature map's sine encoding, attend to the
    query embeddings (memory), which carry a learned position embedding per query slot."""

    def __init__(self, d_model: int, nhead: int, num_layers: int, dim_feedforward: int,
                 feature_size: tuple[int, int], num_queries: int) -> None:
        super().__init__()
        self.decoder = Decoder(num_layers, d_model, nhead, dim_feedforward)
        xavier_init(self.decoder)
        self.memory_pos = nn.Embedding(num_queries, d_model)
        self.register_buffer("query_pos", sine_position_encoding(*feature_size, d_model // 2), persistent=False)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        batch = queries.shape[0]
        query_pos = self.query_pos.unsqueeze(0).expand(batch, -1, -1).to(queries.dtype)
        memory_pos = self.memory_pos.weight.unsqueeze(0).expand(batch, -1, -1).to(queries.dtype)
        x = torch.zeros_like(query_pos)
        for layer in self.decoder.layers:
            x = layer(x, queries, memory_pos, query_pos)
        return self.decoder.norm(x)
