"""Optimizers with weight decay only where it belongs."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..activations.base import ActivationModule
from ..activations.coupler import DynamicCoupler

NO_DECAY_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
                  ActivationModule, DynamicCoupler)


def _published_multi_dim(model: nn.Module) -> set[int]:
    """Parameters that published code keeps multi-dimensional though actlab's are 1-D (IIEU's eta)."""
    found = set()
    for module in model.modules():
        for name in getattr(type(module), "PUBLISHED_MULTI_DIM", ()):
            found.add(id(getattr(module, name)))
    return found


def param_groups(model: nn.Module, weight_decay: float, rule: str = "actlab") -> list[dict]:
    """Two groups: decayed parameters and the rest (weight decay 0).

    Args:
        rule: "actlab": decay weights only, never biases, norms or activation parameters (IIEU's ``eta``
            and term-B LayerNorm, the coupler), timm's tokens and position embeddings; "timm": the
            published IIEU scripts' rule (timm's optimizer factory): decay every parameter that is not
            1-D in the published code and not a bias, so IIEU's ``eta`` and the coupler's weights and
            per-row affine too; "all": every parameter (the published DPA scripts).
    """
    if rule == "all":
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay},
                {"params": [], "weight_decay": 0.0}]
    no_decay: set[int] = set()
    if rule == "actlab":
        for module in model.modules():
            if isinstance(module, NO_DECAY_TYPES):
                no_decay.update(id(p) for p in module.parameters())
    elif rule != "timm":
        raise ValueError(f"weight decay rule must be 'actlab', 'timm' or 'all', got {rule!r}")
    multi_dim = _published_multi_dim(model) if rule == "timm" else set()
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        one_dim = p.ndim <= 1 and id(p) not in multi_dim
        skip = id(p) in no_decay or one_dim or leaf == "bias" or leaf in ("cls_token", "pos_embed", "dist_token")
        (rest if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    nesterov: bool = True, rule: str = "actlab"):
    """SGD (Nesterov momentum by default) or AdamW over ``param_groups(model, weight_decay, rule)``."""
    groups = param_groups(model, weight_decay, rule)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")
