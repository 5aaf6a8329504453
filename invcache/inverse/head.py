"""P⁻¹: a per-query MLP from the heads' outputs (class + box) back to the decoder embedding."""

from __future__ import annotations

import torch
from torch import nn

CLASS_INPUTS = ("onehot", "scores")


class HeadInverse(nn.Module):
    """(logits, boxes) -> (B, Q, d_model) through 96→512→256→d_model with ReLU (96 = 92 classes + 4 box).

    ``onehot`` feeds the one-hot argmax of the logits (the paper's suppression of everything
    but the decision), ``scores`` the softmax scores.
    """

    def __init__(self, num_logits: int, d_model: int, class_input: str = "onehot") -> None:
        super().__init__()
        if class_input not in CLASS_INPUTS:
            raise ValueError(f"class_input must be one of {CLASS_INPUTS}")
        self.class_input = class_input
        self.net = nn.Sequential(
            nn.Linear(num_logits + 4, 512), nn.ReLU(inplace=True),
            nn.Linear(512, 256), nn.ReLU(inplace=True),
            nn.Linear(256, d_model),
        )

    def forward(self, logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.class_input == "onehot":
            classes = nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
        else:
            classes = logits.softmax(-1)
        return self.net(torch.cat([classes, boxes.to(logits.dtype)], dim=-1))
