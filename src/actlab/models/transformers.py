"""Vision transformers from timm, sized for the input: patch 4 for images up to 64 pixels, 16 above."""
from __future__ import annotations

import timm
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer


def _patch(image_size: int) -> int:
    return 4 if image_size <= 64 else 16


def vit_tiny(num_classes=1000, image_size=224, in_channels=3, drop_path_rate=0.1, **kw) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=image_size,
                             patch_size=_patch(image_size), in_chans=in_channels, drop_path_rate=drop_path_rate, **kw)


def cait_xxs24(num_classes=1000, image_size=224, in_channels=3, drop_path_rate=0.1, **kw) -> nn.Module:
    return timm.create_model("cait_xxs24_224", pretrained=False, num_classes=num_classes, img_size=image_size,
                             patch_size=_patch(image_size), in_chans=in_channels, drop_path_rate=drop_path_rate, **kw)


def pvt_tiny(num_classes=1000, image_size=224, in_channels=3, drop_path_rate=0.1, **kw) -> nn.Module:
    """PVT-Tiny's stand-in: timm has PVT-v2 only, so this is pvt_v2_b0 (3.7 M parameters at 1000 classes;
    the DPA paper's PVT-Tiny is PVT-v1, 13.2 M). Any input size divisible by 32 works."""
    if image_size % 32:
        raise ValueError(f"pvt_tiny needs an image size divisible by 32, got {image_size}")
    return timm.create_model("pvt_v2_b0", pretrained=False, num_classes=num_classes, in_chans=in_channels,
                             drop_path_rate=drop_path_rate, **kw)


def tnt_small(num_classes=1000, image_size=224, in_channels=3, drop_path_rate=0.1, **kw) -> nn.Module:
    """TNT-S; at small sizes outer patches of 4 pixels, each of 16 inner pixels (first_stride 1)."""
    small = image_size <= 64
    return timm.create_model("tnt_s_patch16_224", pretrained=False, num_classes=num_classes, img_size=image_size,
                             patch_size=4 if small else 16, first_stride=1 if small else 4, in_chans=in_channels,
                             drop_path_rate=drop_path_rate, **kw)


def vit_micro(num_classes=10, image_size=32, in_channels=3, drop_path_rate=0.0, **kw) -> nn.Module:
    """A ViT small enough for CPU runs: patch 4, width 64, depth 4, 4 heads, MLP ratio 2, class token."""
    return VisionTransformer(img_size=image_size, patch_size=_patch(image_size), in_chans=in_channels,
                             num_classes=num_classes, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
                             drop_path_rate=drop_path_rate, **kw)
