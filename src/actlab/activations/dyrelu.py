"""Dynamic ReLU, channel-wise variant DY-ReLU-B (Chen et al., ECCV 2020).

    out_c = max_k (a_k,c * x_c + b_k,c),  (a, b) = init + lambda * (2 * sigmoid(MLP(GAP(x))) - 1)

k = 2 pieces, reduction 4, lambda_a = 1, lambda_b = 0.5, init a = (1, 0), b = (0, 0): ReLU at init.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import ActivationModule
from .layout import global_pool, per_channel
from .registry import LAYOUTS, ActivationSpec, register


class DyReLU(ActivationModule):
    """Shapes: (B, C, H, W), (B, C) or (B, N, C) -> same; with ``nhwc``, (B, *S, C) -> same."""

    def __init__(self, channels: int, reduction: int = 4, k: int = 2, nhwc: bool = False):
        super().__init__()
        self.nhwc = nhwc
        self.channels, self.k = channels, k
        self.fc1 = nn.Linear(channels, max(channels // reduction, 1))
        self.fc2 = nn.Linear(max(channels // reduction, 1), 2 * k * channels)
        self.register_buffer("lambdas", torch.tensor([1.0] * k + [0.5] * k), persistent=False)
        self.register_buffer("init_v", torch.tensor([1.0] + [0.0] * (2 * k - 1)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = 2 * torch.sigmoid(self.fc2(torch.relu(self.fc1(global_pool(x, nhwc=self.nhwc))))) - 1
        coefs = theta.view(-1, self.channels, 2 * self.k) * self.lambdas + self.init_v  # (B, C, 2k)
        out = None
        for j in range(self.k):
            piece = x * per_channel(coefs[..., j], x, self.nhwc) + per_channel(coefs[..., self.k + j], x, self.nhwc)
            out = piece if out is None else torch.maximum(out, piece)
        return out

    def extra_repr(self) -> str:
        return f"{self.channels}, k={self.k}" + (", nhwc=True" if self.nhwc else "")


register(ActivationSpec("dyrelu", DyReLU, needs_channels=True, layouts=LAYOUTS, summary="dynamic ReLU (DY-ReLU-B)"))
