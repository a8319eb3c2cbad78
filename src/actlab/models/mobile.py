"""torchvision's MobileNetV2 and ShuffleNetV2 with stems adapted to small images."""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from .cifar import make_fuse

# the published IIEU-DC MobileNetV2's couplers
COUPLER = {"reduction": 4, "eta_init": 0.05}


class CoupledResidual(nn.Module):
    """An inverted-residual block with an identity shortcut whose ``x + conv(x)`` is a fusion module (a
    Dynamic Coupler for IIEU-DC). Keeps the block's ``conv`` under the same name (same state_dict keys)."""

    def __init__(self, conv: nn.Module, fuse: nn.Module):
        super().__init__()
        self.conv = conv
        self.fuse = fuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x), x)


def mobilenet_v2(num_classes: int = 1000, image_size: int = 224, width: float = 1.0, in_channels: int = 3,
                 fuse: str = "add", dropout: float = 0.2, **kw) -> nn.Module:
    """MobileNetV2 (``width`` multiplies every layer's channels; the IIEU paper uses 0.17 and 1.0). Below
    128 pixels the stem conv and the first down-sampling block use stride 1 (total stride 8, not 32).

    Args:
        fuse: ``"add"`` (torchvision's ``x + conv(x)``) or ``"coupler"``: a Dynamic Coupler on every
            identity residual, as the published IIEU-DC MobileNetV2 (reduction 4, threshold init 0.05).
        dropout: before the classifier (torchvision 0.2; the IIEU paper's MobileNetV2 has none).
    """
    model = torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=width, dropout=dropout, **kw)
    if fuse != "add":
        for i, block in enumerate(model.features):
            if getattr(block, "use_res_connect", False):
                model.features[i] = CoupledResidual(block.conv, make_fuse(fuse, block.out_channels, **COUPLER))
    stem = model.features[0][0]
    if in_channels != 3:
        model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stem.stride, 1, bias=False)
    if image_size < 128:
        model.features[0][0].stride = (1, 1)
        model.features[2].conv[1][0].stride = (1, 1)  # the first stride-2 block (expansion 6, 24 channels)
    model.num_classes = num_classes
    return model


def shufflenet_v2(num_classes: int = 1000, image_size: int = 224, in_channels: int = 3, **kw) -> nn.Module:
    """ShuffleNetV2 1.0x. Below 128 pixels: stride-1 stem conv and no max-pool (total stride 8)."""
    model = torchvision.models.shufflenet_v2_x1_0(num_classes=num_classes, **kw)
    if in_channels != 3:
        model.conv1[0] = nn.Conv2d(in_channels, 24, 3, 2, 1, bias=False)
    if image_size < 128:
        model.conv1[0].stride = (1, 1)
        model.maxpool = nn.Identity()
    model.num_classes = num_classes
    return model
