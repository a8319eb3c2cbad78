"""Funnel ReLU (Ma et al., ECCV 2020): max(x, BN(DWConv3x3(x))). Needs spatial (B, C, H, W) input."""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import ActivationModule
from .registry import ActivationSpec, register


class FReLU(ActivationModule):
    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"frelu needs a (B, C, H, W) input, got shape {tuple(x.shape)}")
        return torch.maximum(x, self.bn(self.conv(x)))


register(ActivationSpec("frelu", FReLU, needs_channels=True, layouts=("nchw",), summary="funnel ReLU"))
