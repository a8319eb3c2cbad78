"""Dense producers: the modules that compute ``x @ W^T + b`` over the last dim, whose output can feed an
activation that needs its producer's filters (IIEU-B).

Two kinds: ``nn.Linear`` (weight (out, in)) and Hugging Face transformers' ``Conv1D`` (GPT-2's MLP and
attention projections: the same map with its weight stored transposed, (in, out)). ``Conv1D`` is
recognised once ``transformers`` is imported; actlab does not import it.
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn


def hf_conv1d_type() -> type | None:
    """transformers' ``Conv1D`` class when transformers is loaded, else None."""
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    return conv1d if isinstance(conv1d, type) else None


def is_hf_conv1d(module: nn.Module) -> bool:
    conv1d = hf_conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_dense(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a transformers ``Conv1D`` (subclasses included)."""
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def is_plain_dense(module: nn.Module) -> bool:
    """A dense producer whose forward is its class's own (a subclass that changes the forward is not)."""
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    conv1d = hf_conv1d_type()
    return conv1d is not None and isinstance(module, conv1d) and type(module).forward is conv1d.forward


def dense_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a dense producer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_hf_conv1d(module):
        return module.nx, module.nf
    raise TypeError(f"expected nn.Linear or transformers' Conv1D, got {type(module).__name__}")


def dense_filters(module: nn.Module) -> torch.Tensor:
    """The filters of a dense producer as rows, (out_features, in_features): the Linear's weight, or a view
    of the transposed ``Conv1D`` weight (gradients reach the parameter through the view)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_hf_conv1d(module):
        return module.weight.t()
    raise TypeError(f"expected nn.Linear or transformers' Conv1D, got {type(module).__name__}")
