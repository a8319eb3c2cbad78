"""Marker base class so the converter recognises actlab's own modules as activations."""
from __future__ import annotations

import torch.nn as nn


class ActivationModule(nn.Module):
    """Base of every actlab activation module (lets ``convert`` swap actlab activations too)."""

    def site_note(self) -> str:
        """A few words on how this module reads its site, for the conversion report ("" when nothing to say)."""
        return ""

    def release(self) -> None:
        """Called when ``convert`` replaces this module: undo what building it attached elsewhere
        (hooks on a producer). Nothing by default."""
