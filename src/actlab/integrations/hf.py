"""actlab with Hugging Face transformers: converted models saved with ``save_pretrained`` and loaded back,
and a ``Trainer`` that passes DPA its class targets.

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
from transformers import Trainer

from ..activations import dpa_loss, targets
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



class DPATrainer(Trainer):
    """transformers' ``Trainer`` for models with DPA sites: each training forward runs inside
    ``actlab.targets(model, inputs["labels"], attention_mask=inputs.get("attention_mask"))`` (padding reaches
    no memory) and the loss adds ``dpa_weight * actlab.dpa_loss(model)`` (DPA's channel loss). Evaluation
    forwards run as the base class's (DPA needs no targets in eval mode).

    Args:
        dpa_weight: the channel loss's weight (1 for CIFAR-10, 5 for CIFAR-100 in the DPA paper).
        label_key: the batch's key of the class labels.
        *args: ``Trainer``'s.
        **kwargs: ``Trainer``'s.
    """

    def __init__(self, *args, dpa_weight: float = 1.0, label_key: str = "labels", **kwargs):
        super().__init__(*args, **kwargs)
        self.dpa_weight, self.label_key = dpa_weight, label_key

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        labels = inputs.get(self.label_key)
        if labels is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        with targets(model, labels, attention_mask=inputs.get("attention_mask")):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        loss = loss + self.dpa_weight * dpa_loss(model)
        return (loss, outputs) if return_outputs else loss
