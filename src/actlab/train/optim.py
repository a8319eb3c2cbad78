"""Optimizers with weight decay only where it belongs.

What takes no decay is asked of the modules, as timm does: a module's ``no_weight_decay()`` names its
parameters (or fnmatch patterns of their names) that take none. actlab's activations and the Dynamic
Coupler name all of theirs; timm models name their tokens and position embeddings. torch's norm layers,
biases and 1-D parameters take none either.
"""
from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn

NO_DECAY_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def declared_no_decay(model: nn.Module) -> set[int]:
    """ids of the parameters that their modules' ``no_weight_decay()`` name (relative to that module; a
    name with ``*`` / ``?`` is an fnmatch pattern). Names a module lists that it does not hold (timm lists
    ``dist_token`` on models without one) match nothing."""
    found: set[int] = set()
    for module in model.modules():
        hook = getattr(module, "no_weight_decay", None)
        if not callable(hook):
            continue
        patterns = set(hook())
        for name, p in module.named_parameters():
            if name in patterns or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
                found.add(id(p))
    return found


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
        rule: "actlab": decay weights only, never biases, norms, 1-D parameters or what a module's
            ``no_weight_decay()`` names (every parameter of actlab's activations and couplers, timm's
            tokens and position embeddings); "timm": the published IIEU scripts' rule (timm's optimizer
            factory): decay every parameter that is not 1-D in the published code and not a bias, so
            IIEU's ``eta`` and the coupler's weights and per-row affine too; "all": every parameter (the
            published DPA scripts).
    """
    if rule == "all":
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay},
                {"params": [], "weight_decay": 0.0}]
    no_decay: set[int] = set()
    if rule == "actlab":
        for module in model.modules():
            if isinstance(module, NO_DECAY_TYPES):
                no_decay.update(id(p) for p in module.parameters())
        no_decay |= declared_no_decay(model)
    elif rule != "timm":
        raise ValueError(f"weight decay rule must be 'actlab', 'timm' or 'all', got {rule!r}")
    multi_dim = _published_multi_dim(model) if rule == "timm" else set()
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        one_dim = p.ndim <= 1 and id(p) not in multi_dim
        skip = id(p) in no_decay or one_dim or name.rsplit(".", 1)[-1] == "bias"
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
