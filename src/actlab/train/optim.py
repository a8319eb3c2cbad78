"""Optimizers with weight decay only where it belongs."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..activations.base import ActivationModule
from ..activations.coupler import DynamicCoupler

NO_DECAY_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
                  ActivationModule, DynamicCoupler)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and the rest (biases, norms, activation parameters such as IIEU's
    ``eta`` and term-B LayerNorm, the coupler, timm's tokens and position embeddings)."""
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, NO_DECAY_TYPES):
            no_decay.update(id(p) for p in module.parameters())
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        skip = id(p) in no_decay or p.ndim <= 1 or leaf in ("cls_token", "pos_embed", "dist_token")
        (rest if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9):
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")
