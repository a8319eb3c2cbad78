"""torchvision's MobileNetV2 and ShuffleNetV2 with stems adapted to small images."""
from __future__ import annotations

import torch.nn as nn
import torchvision


def mobilenet_v2(num_classes: int = 1000, image_size: int = 224, width: float = 1.0, in_channels: int = 3,
                 **kw) -> nn.Module:
    """MobileNetV2 (``width`` multiplies every layer's channels; the IIEU paper uses 0.17 and 1.0). Below
    128 pixels the stem conv and the first down-sampling block use stride 1 (total stride 8, not 32)."""
    model = torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=width, **kw)
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
