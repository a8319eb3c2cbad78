"""ACON-C and Meta-ACON (Ma et al., CVPR 2021).

    acon_c(x) = (p1 - p2) * x * sigmoid(beta * (p1 - p2) * x) + p2 * x

ACON-C learns beta per channel; Meta-ACON predicts it per sample and channel from the global mean,
``beta = sigmoid(W2 W1 GAP(x))`` (the paper's form; hidden width max(r, C // r), r = 16).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import ActivationModule
from .layout import global_pool, per_channel
from .registry import LAYOUTS, ActivationSpec, register


def _acon(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, beta: torch.Tensor, nhwc: bool) -> torch.Tensor:
    dpx = (per_channel(p1, x, nhwc) - per_channel(p2, x, nhwc)) * x
    return dpx * torch.sigmoid(per_channel(beta, x, nhwc) * dpx) + per_channel(p2, x, nhwc) * x


class AconC(ActivationModule):
    """Shapes: (B, C, H, W), (B, C) or (B, N, C) -> same; with ``nhwc``, (B, *S, C) -> same.
    p1, p2 ~ N(0, 1) and beta = 1 at init."""

    def __init__(self, channels: int, nhwc: bool = False):
        super().__init__()
        self.nhwc = nhwc
        self.p1 = nn.Parameter(torch.randn(channels))
        self.p2 = nn.Parameter(torch.randn(channels))
        self.beta = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _acon(x, self.p1, self.p2, self.beta, self.nhwc)

    def extra_repr(self) -> str:
        return f"{self.p1.numel()}" + (", nhwc=True" if self.nhwc else "")


class MetaAcon(ActivationModule):
    """Meta-ACON: beta (B, C) = sigmoid(fc2(fc1(GAP(x)))). Shapes as ``AconC``."""

    def __init__(self, channels: int, reduction: int = 16, nhwc: bool = False):
        super().__init__()
        self.nhwc = nhwc
        hidden = max(reduction, channels // reduction)
        self.p1 = nn.Parameter(torch.randn(channels))
        self.p2 = nn.Parameter(torch.randn(channels))
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta = torch.sigmoid(self.fc2(self.fc1(global_pool(x, nhwc=self.nhwc))))
        return _acon(x, self.p1, self.p2, beta, self.nhwc)

    def extra_repr(self) -> str:
        return f"{self.p1.numel()}, hidden={self.fc1.out_features}" + (", nhwc=True" if self.nhwc else "")


register(ActivationSpec("acon_c", AconC, needs_channels=True, layouts=LAYOUTS,
                        summary="ACON-C, learned per-channel switch"))
register(ActivationSpec("meta_acon", MetaAcon, needs_channels=True, layouts=LAYOUTS,
                        summary="Meta-ACON, switch predicted per sample"))
