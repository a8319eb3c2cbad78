"""actlab with Lightning: a LightningModule mixin that passes DPA its class targets and adds its channel loss.

    class Classifier(DPAMixin, lightning.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

Each ``training_step`` then runs inside ``actlab.targets(self, targets)`` (the targets from the batch:
its second item, or its ``"labels"`` / ``"label"`` / ``"targets"`` entry; override ``dpa_targets`` for other
batches) and ``dpa_weight * actlab.dpa_loss(self)`` is added to the loss it returns (a tensor, or a dict's
``"loss"``). The backward Lightning runs afterwards updates DPA's gradient memories as usual.
"""
from __future__ import annotations

import functools

import torch

from ..activations import dpa_loss, targets

_LABEL_KEYS = ("labels", "label", "targets", "target", "y")


class DPAMixin:
    """Mix into a ``LightningModule`` (before it in the bases) whose ``training_step`` returns the task loss.

    Attributes:
        dpa_weight: the channel loss's weight (1 for CIFAR-10, 5 for CIFAR-100 in the DPA paper).
    """

    dpa_weight: float = 1.0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("training_step")
        if step is not None and not getattr(step, "_actlab_dpa", False):
            cls.training_step = _with_targets(step)

    def dpa_targets(self, batch) -> torch.Tensor:
        """The class targets of a batch: its second item, or a dict's labels entry."""
        if isinstance(batch, dict):
            key = next((k for k in _LABEL_KEYS if k in batch), None)
            if key is None:
                raise KeyError(f"DPAMixin: the batch has none of the label keys {_LABEL_KEYS}; override "
                               "dpa_targets(batch)")
            return batch[key]
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[1]
        raise TypeError(f"DPAMixin: cannot find the targets in a batch of type {type(batch).__name__}; override "
                        "dpa_targets(batch)")


def _with_targets(step):
    @functools.wraps(step)
    def training_step(self, batch, *args, **kwargs):
        with targets(self, self.dpa_targets(batch)):
            out = step(self, batch, *args, **kwargs)
        extra = self.dpa_weight * dpa_loss(self)
        if isinstance(out, dict):
            return {**out, "loss": out["loss"] + extra}
        return out + extra

    training_step._actlab_dpa = True
    return training_step
