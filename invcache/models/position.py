"""DETR's sine position encoding of a feature map (normalize=True, scale 2π, temperature 10000)."""

from __future__ import annotations

import math

import torch


def sine_position_encoding(
    height: int,
    width: int,
    num_pos_feats: int,
    *,
    temperature: float = 10000.0,
    scale: float = 2 * math.pi,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(height·width, 2·num_pos_feats) encoding, token-major (row-major h, w), y features first.

    Images have a fixed size and no padding, so the mask DETR cumsums is all ones and the
    cumulative sums are plain ranges.
    """
    eps = 1e-6
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    y = y / (height + eps) * scale
    x = x / (width + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_y = y[:, None] / dim_t
    pos_x = x[:, None] / dim_t
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
    grid_y = pos_y[:, None, :].expand(height, width, num_pos_feats)
    grid_x = pos_x[None, :, :].expand(height, width, num_pos_feats)
    return torch.cat((grid_y, grid_x), dim=2).reshape(height * width, 2 * num_pos_feats)
