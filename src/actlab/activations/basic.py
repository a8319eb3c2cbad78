"""Baselines that torch already provides, plus a layout-aware per-channel PReLU."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import ActivationModule
from .layout import layout_of, per_channel
from .registry import LAYOUTS, ActivationSpec, register


class ChannelPReLU(nn.PReLU, ActivationModule):
    """``nn.PReLU`` with one slope per channel, where the channel dim follows the input layout
    (dim 1 for (B, C, H, W) and (B, C); the last dim for tokens (B, N, C) and, with ``nhwc``, for
    (B, *S, C))."""

    def __init__(self, num_parameters: int = 1, init: float = 0.25, nhwc: bool = False):
        super().__init__(num_parameters=num_parameters, init=init)
        self.nhwc = nhwc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if layout_of(x, self.nhwc) == "nlc" and self.num_parameters > 1:
            return torch.where(x >= 0, x, per_channel(self.weight, x, self.nhwc) * x)
        return F.prelu(x, self.weight)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", nhwc=True" if self.nhwc else "")


def _prelu(channels: int, init: float = 0.25, nhwc: bool = False) -> nn.Module:
    return ChannelPReLU(num_parameters=channels, init=init, nhwc=nhwc)


register(ActivationSpec("relu", nn.ReLU, summary="max(x, 0)"))
register(ActivationSpec("leaky_relu", lambda negative_slope=0.01: nn.LeakyReLU(negative_slope),
                        summary="max(x, 0) + slope * min(x, 0), slope 0.01"))
register(ActivationSpec("prelu", _prelu, needs_channels=True, layouts=LAYOUTS, summary="PReLU, one learnable slope per channel"))
register(ActivationSpec("elu", nn.ELU, summary="ELU, alpha 1"))
register(ActivationSpec("selu", nn.SELU, summary="SELU"))
register(ActivationSpec("softplus", nn.Softplus, summary="log(1 + exp(x))"))
register(ActivationSpec("gelu", nn.GELU, summary="x * Phi(x)"))
register(ActivationSpec("silu", nn.SiLU, aliases=("swish",), summary="x * sigmoid(x)"))
register(ActivationSpec("mish", nn.Mish, summary="x * tanh(softplus(x))"))

__all__ = ["ChannelPReLU"]
