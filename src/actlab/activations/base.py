"""Marker base class so the converter recognises actlab's own modules as activations."""
from __future__ import annotations

import torch.nn as nn


class ActivationModule(nn.Module):
    """Base of every actlab activation module (lets ``convert`` swap actlab activations too)."""

    def no_weight_decay(self) -> set[str]:
        """Names of this module's parameters that take no weight decay (timm's convention, which actlab's
        optimizer asks every module): all of them. An activation's parameters are thresholds, gates and
        norms that decay would pull towards another function, not weights."""
        return {name for name, _ in self.named_parameters()}

    def site_note(self) -> str:
        """A few words on how this module reads its site, for the conversion report ("" when nothing to say)."""
        return ""

    def release(self) -> None:
        """Called when ``convert`` replaces this module: undo what building it attached elsewhere
        (hooks on a producer). Nothing by default."""
