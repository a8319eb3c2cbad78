"""actlab with Hugging Face transformers: converted models saved with ``save_pretrained`` and loaded back.

A converted model's weights file holds the conversion record (``actlab_conversion``, as every state_dict
of a converted model does) and ``convert`` also writes it into the model's config, so ``config.json``
says how the model was converted. ``from_pretrained(ModelClass, path)`` loads such a directory: the
model as transformers builds it, converted as recorded, then every weight loaded strictly. (The class's
own ``from_pretrained`` builds the unconverted model: its load report lists actlab's weights as
UNEXPECTED and the model runs its original activations.)
"""
from __future__ import annotations

import json
import os

import torch.nn as nn
from safetensors.torch import load_file

from ..convert import RECORD_KEY, load_converted

_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"


def from_pretrained(model_class, path: str, **kwargs) -> nn.Module:
    """``model_class.from_pretrained(path, **kwargs)``, converted as the saved weights record and loaded.

    Args:
        model_class: a transformers model class (``BertForSequenceClassification``, ``AutoModel`` ...).
        path: a directory written by ``save_pretrained`` of a converted model.
        **kwargs: passed to ``from_pretrained``.
    Raises:
        ValueError: the directory holds no conversion record (load it with ``model_class.from_pretrained``),
            or weights that the converted model does not have.
    """
    model = model_class.from_pretrained(path, **kwargs)
    state = _saved_state(path)
    if RECORD_KEY not in state:
        raise ValueError(f"{path}: the saved weights hold no {RECORD_KEY!r} record: the model was not converted "
                         f"by actlab (load it with {model_class.__name__}.from_pretrained)")
    result = load_converted(model, state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: weights the converted model does not have: {result.unexpected_keys}")
    untied = [k for k in result.missing_keys if not _tied_to_loaded(model, k, state)]
    if untied:
        raise ValueError(f"{path}: weights missing from the saved files: {untied}")
    return model


def _saved_state(path: str) -> dict:
    """Every tensor of a ``save_pretrained`` directory's safetensors files (one file or shards)."""
    index = os.path.join(path, _INDEX)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [_WEIGHTS]
    state = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    return state


def _tied_to_loaded(model: nn.Module, key: str, state: dict) -> bool:
    """Whether parameter ``key`` is the same tensor as a parameter the saved files hold (transformers saves
    tied weights once)."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensor = tensors.get(key)
    return tensor is not None and any(other is tensor and name in state for name, other in tensors.items())

