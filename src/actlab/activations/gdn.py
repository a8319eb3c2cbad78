"""Generalised divisive normalisation (Balle et al., 2016) as an activation.

    y_c = x_c / sqrt(beta_c + sum_j gamma_cj * x_j ** 2)

beta >= 1e-6 and gamma >= 0 are enforced by clamping in the forward pass.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import ActivationModule
from .layout import layout_of
from .registry import LAYOUTS, ActivationSpec, register


class GDN(ActivationModule):
    """Args:
        channels: C.
        beta_min: lower bound of beta.
        gamma_init: initial diagonal of gamma.
        nhwc: inputs of rank >= 3 carry their channels last, (B, *S, C).
    Shapes: (B, C, H, W), (B, C) or (B, N, C) -> same; with ``nhwc``, (B, *S, C) -> same.
    """

    def __init__(self, channels: int, beta_min: float = 1e-6, gamma_init: float = 0.1, nhwc: bool = False):
        super().__init__()
        self.nhwc = nhwc
        self.beta_min = beta_min
        self.beta = nn.Parameter(torch.ones(channels))
        self.gamma = nn.Parameter(gamma_init * torch.eye(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta = self.beta.clamp_min(self.beta_min)
        gamma = self.gamma.clamp_min(0.0)
        if layout_of(x, self.nhwc) == "nchw":
            c = gamma.shape[0]
            denom = F.conv2d(x * x, gamma.view(c, c, 1, 1), beta)
        else:
            denom = F.linear(x * x, gamma, beta)
        return x * torch.rsqrt(denom)

    def extra_repr(self) -> str:
        return f"{self.beta.numel()}" + (", nhwc=True" if self.nhwc else "")


register(ActivationSpec("gdn", GDN, needs_channels=True, layouts=LAYOUTS, summary="generalised divisive normalisation"))
