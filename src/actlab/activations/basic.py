"""Baselines that torch already provides, plus a layout-aware per-channel PReLU."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import ActivationModule
from .layout import per_channel
from .registry import ActivationSpec, register


class ChannelPReLU(nn.PReLU, ActivationModule):
    """``nn.PReLU`` with one slope per channel, where the channel dim follows the input layout
    (dim 1 for (B, C, H, W) and (B, C); the last dim for tokens (B, N, C))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and self.num_parameters > 1:
            return torch.where(x >= 0, x, per_channel(self.weight, x) * x)
        return F.prelu(x, self.weight)


def _prelu(channels: int, init: float = 0.25) -> nn.Module:
    return ChannelPReLU(num_parameters=channels, init=init)


register(ActivationSpec("relu", nn.ReLU, summary="max(x, 0)"))
register(ActivationSpec("leaky_relu", lambda negative_slope=0.01: nn.LeakyReLU(negative_slope),
                        summary="max(x, 0) + slope * min(x, 0), slope 0.01"))
register(ActivationSpec("prelu", _prelu, needs_channels=True, summary="PReLU, one learnable slope per channel"))
register(ActivationSpec("elu", nn.ELU, summary="ELU, alpha 1"))
register(ActivationSpec("selu", nn.SELU, summary="SELU"))
register(ActivationSpec("softplus", nn.Softplus, summary="log(1 + exp(x))"))
register(ActivationSpec("gelu", nn.GELU, summary="x * Phi(x)"))
register(ActivationSpec("silu", nn.SiLU, aliases=("swish",), summary="x * sigmoid(x)"))
register(ActivationSpec("mish", nn.Mish, summary="x * tanh(softplus(x))"))

__all__ = ["ChannelPReLU"]
