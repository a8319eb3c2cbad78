"""ACON-C and Meta-ACON (Ma et al., CVPR 2021).

    acon_c(x) = (p1 - p2) * x * sigmoid(beta * (p1 - p2) * x) + p2 * x

ACON-C learns beta per channel; Meta-ACON predicts it per sample and channel from the global mean,
``beta = sigmoid(W2 W1 GAP(x))`` (the paper's form; hidden width max(r, C // r), r = 16).

Initialisation: the paper does not state one; its authors' code draws p1, p2 ~ N(0, 1) (beta = 1 for
ACON-C), which is ``init="randn"``, the default. The unit's slope is then p1 for large x and p2 for very
negative x, per channel, often above 1 in magnitude or negative: a network without normalisation layers
can blow up (torchvision squeezenet1_1 with Meta-ACON, batch 8 at 64x64, SGD lr 0.01 momentum 0.9: loss
3e8-2e15 at the second step and NaN from the third, 3 of 3 seeds). ``init="swish"`` starts from p1 = 1,
p2 = 0, where ACON-C is x * sigmoid(beta * x), Swish (the same runs: loss 2.30 -> 2.29-2.30 in 10 steps).
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


def _switch_init(channels: int, init: str) -> tuple[nn.Parameter, nn.Parameter]:
    """(p1, p2) for ``init``: "randn" (N(0, 1), the ACON authors' code) or "swish" (1 and 0)."""
    if init == "randn":
        return nn.Parameter(torch.randn(channels)), nn.Parameter(torch.randn(channels))
    if init == "swish":
        return nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))
    raise ValueError(f"init must be 'randn' or 'swish', got {init!r}")


class AconC(ActivationModule):
    """Shapes: (B, C, H, W), (B, C) or (B, N, C) -> same; with ``nhwc``, (B, *S, C) -> same.
    beta = 1 at init; p1, p2 from ``init`` (module docstring)."""

    def __init__(self, channels: int, nhwc: bool = False, init: str = "randn"):
        super().__init__()
        self.nhwc = nhwc
        self.p1, self.p2 = _switch_init(channels, init)
        self.beta = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _acon(x, self.p1, self.p2, self.beta, self.nhwc)

    def extra_repr(self) -> str:
        return f"{self.p1.numel()}" + (", nhwc=True" if self.nhwc else "")


class MetaAcon(ActivationModule):
    """Meta-ACON: beta (B, C) = sigmoid(fc2(fc1(GAP(x)))). Shapes as ``AconC``."""

    def __init__(self, channels: int, reduction: int = 16, nhwc: bool = False, init: str = "randn"):
        super().__init__()
        self.nhwc = nhwc
        hidden = max(reduction, channels // reduction)
        self.p1, self.p2 = _switch_init(channels, init)
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
