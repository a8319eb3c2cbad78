"""CIFAR-form CNNs (3x3 stems, no early down-sampling for 32x32 inputs): resnet20, resnet18, vgg11, alexnet.

Every network takes ``act_layer`` (a callable returning a fresh activation module, ReLU by default) and
``fuse`` for the residual fusion (``"add"`` or ``"coupler"``, IIEU-DC's Dynamic Coupler).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..activations.coupler import DynamicCoupler

ActLayer = Callable[[], nn.Module]


class Add(nn.Module):
    """``main + shortcut`` as a module, so that the fusion point is visible and replaceable."""

    def forward(self, main: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return main + shortcut


def make_fuse(kind: str, channels: int, **coupler_kw) -> nn.Module:
    """The residual fusion: ``Add()`` or a ``DynamicCoupler(channels, **coupler_kw)``."""
    if kind == "add":
        return Add()
    if kind == "coupler":
        return DynamicCoupler(channels, **coupler_kw)
    raise ValueError(f"fuse must be 'add' or 'coupler', got {kind!r}")


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]


def make_stages(cin: int, widths, blocks, expansion: int, make_block) -> tuple[nn.Sequential, int]:
    """Residual stages: the first keeps the resolution, later ones halve it in their first block.
    Returns the stages and their output channels; ``make_block(cin, width, stride)`` builds one block."""
    stages = []
    for i, (width, n) in enumerate(zip(widths, blocks)):
        layers = []
        for j in range(n):
            layers.append(make_block(cin, width, 2 if (i > 0 and j == 0) else 1))
            cin = width * expansion
        stages.append(nn.Sequential(*layers))
    return nn.Sequential(*stages), cin


class BasicBlock(nn.Module):
    """conv-BN-act, conv-BN, fuse with the (projected) shortcut, act."""

    def __init__(self, cin: int, cout: int, stride: int, act_layer: ActLayer, fuse: str = "add"):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, cout, 3, stride)
        self.act1 = act_layer()
        self.conv2, self.bn2 = conv_bn(cout, cout, 3)
        self.downsample = nn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else None
        self.fuse = make_fuse(fuse, cout)
        self.act2 = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act2(self.fuse(out, shortcut))


class CifarResNet(nn.Module):
    """ResNet of BasicBlocks with a 3x3 stem and no max-pool.

    Args:
        widths: channels of each stage (the first stage keeps the resolution, later ones halve it).
        blocks: blocks per stage.
        num_classes, in_channels: classifier outputs, image channels.
        act_layer: callable giving each activation site its own module.
        fuse: ``"add"`` or ``"coupler"`` at every residual fusion.
    """

    def __init__(self, widths, blocks, num_classes: int = 10, in_channels: int = 3,
                 act_layer: ActLayer = nn.ReLU, fuse: str = "add"):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Sequential(*conv_bn(in_channels, widths[0]), act_layer())
        self.stages, cin = make_stages(widths[0], widths, blocks, 1,
                                       lambda cin, width, stride: BasicBlock(cin, width, stride, act_layer, fuse))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


def resnet20(**kw) -> CifarResNet:
    """He et al.'s CIFAR ResNet-20: 16-32-64 channels, 3 blocks per stage (0.27 M parameters)."""
    return CifarResNet((16, 32, 64), (3, 3, 3), **kw)


def resnet18(**kw) -> CifarResNet:
    """ResNet-18 in CIFAR form: 3x3 stem, no max-pool, 64-128-256-512, 2 blocks per stage."""
    return CifarResNet((64, 128, 256, 512), (2, 2, 2, 2), **kw)


class VGG(nn.Module):
    """VGG with BatchNorm for 32x32 inputs (five 2x2 max-pools to 1x1, then one Linear classifier); smaller
    inputs reach 1x1 earlier and keep it (the pools round up)."""

    def __init__(self, config, num_classes: int = 10, in_channels: int = 3, act_layer: ActLayer = nn.ReLU):
        super().__init__()
        self.num_classes = num_classes
        layers, cin = [], in_channels
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))  # a 1x1 map stays 1x1 below 32x32
            else:
                layers += [*conv_bn(cin, v), act_layer()]
                cin = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def vgg11(**kw) -> VGG:
    return VGG((64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"), **kw)


class AlexNet(nn.Module):
    """AlexNet in CIFAR form: five 3x3 conv layers with BatchNorm, three max-pools, a two-layer head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, act_layer: ActLayer = nn.ReLU):
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            *conv_bn(in_channels, 64), act_layer(), nn.MaxPool2d(2),
            *conv_bn(64, 192), act_layer(), nn.MaxPool2d(2),
            *conv_bn(192, 384), act_layer(), *conv_bn(384, 256), act_layer(), *conv_bn(256, 256), act_layer(),
            nn.MaxPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(256 * 4, 1024), act_layer(), nn.Linear(1024, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def alexnet(**kw) -> AlexNet:
    return AlexNet(**kw)
