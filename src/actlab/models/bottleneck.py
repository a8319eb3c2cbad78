"""The IIEU paper's bottleneck ResNets (resnet14 / resnet26 / resnet50) with its IIEU placement.

``iieu_placement=True`` (used for iieu_b / iieu_dc, as in the IIEU paper): conv-BN-act after bn1, bn2 and bn3
(act3 *before* the residual fusion), an activation on the BN'd projection shortcut, and no activation
after the fusion. ``False``: the standard block (activation after the add).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .cifar import ActLayer, conv_bn, make_fuse, make_stages


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, act_layer: ActLayer, iieu_placement: bool,
                 fuse: str = "add"):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = conv_bn(cin, width, 1)
        self.act1 = act_layer()
        self.conv2, self.bn2 = conv_bn(width, width, 3, stride)
        self.act2 = act_layer()
        self.conv3, self.bn3 = conv_bn(width, cout, 1)
        self.iieu_placement = iieu_placement
        self.act3 = act_layer() if iieu_placement else nn.Identity()
        self.downsample = None
        if stride != 1 or cin != cout:
            shortcut_act = [act_layer()] if iieu_placement else []
            self.downsample = nn.Sequential(*conv_bn(cin, cout, 1, stride), *shortcut_act)
        self.fuse = make_fuse(fuse, cout)
        self.act_out = nn.Identity() if iieu_placement else act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        out = self.act3(self.bn3(self.conv3(out)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act_out(self.fuse(out, shortcut))


class BottleneckResNet(nn.Module):
    """Bottleneck ResNet; the stem adapts to the input: 7x7/2 conv + max-pool for images of 128 pixels and
    more (ImageNet), a 3x3/1 conv without pooling below (CIFAR-size images)."""

    def __init__(self, blocks, num_classes: int = 1000, in_channels: int = 3, image_size: int = 224,
                 act_layer: ActLayer = nn.ReLU, iieu_placement: bool = False, fuse: str = "add"):
        super().__init__()
        self.num_classes = num_classes
        if image_size >= 128:
            self.stem = nn.Sequential(*conv_bn(in_channels, 64, 7, 2), act_layer(), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(*conv_bn(in_channels, 64, 3, 1), act_layer())
        widths = [64 * 2 ** i for i in range(len(blocks))]
        self.stages, cin = make_stages(64, widths, blocks, Bottleneck.expansion, lambda cin, width, stride: Bottleneck(
            cin, width, stride, act_layer, iieu_placement, fuse))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


def resnet14(**kw) -> BottleneckResNet:
    return BottleneckResNet((1, 1, 1, 1), **kw)


def resnet26(**kw) -> BottleneckResNet:
    return BottleneckResNet((2, 2, 2, 2), **kw)


def resnet50(**kw) -> BottleneckResNet:
    return BottleneckResNet((3, 4, 6, 3), **kw)
