"""Smooth Maximum Unit (Biswas et al., CVPR 2022).

    smu(x) = ((1 + alpha) * x + (1 - alpha) * x * erf(mu * (1 - alpha) * x)) / 2

alpha fixed at 0.25, mu a learnable scalar initialised at 1e6 (the paper's defaults).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import ActivationModule
from .registry import ActivationSpec, register


class SMU(ActivationModule):
    def __init__(self, alpha: float = 0.25, mu: float = 1e6):
        super().__init__()
        self.alpha = alpha
        self.mu = nn.Parameter(torch.tensor(float(mu)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha
        return 0.5 * ((1 + a) * x + (1 - a) * x * torch.erf(self.mu * (1 - a) * x))


register(ActivationSpec("smu", SMU, summary="smooth maximum unit (alpha 0.25, learnable mu)"))
