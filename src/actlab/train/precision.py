"""Mixed precision: which autocast dtype a run uses, and whether it needs a GradScaler."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

AMP_CHOICES = ("auto", "bf16", "fp16", "off")


@dataclass(frozen=True)
class Precision:
    """The resolved ``amp`` setting of a run.

    Args:
        dtype: the autocast dtype, or None for full float32.
        scaler: whether losses are scaled (float16 only: bfloat16 has float32's exponent range).
    """

    dtype: torch.dtype | None = None
    scaler: bool = False

    @classmethod
    def resolve(cls, amp: str, device: torch.device) -> "Precision":
        """``"auto"``: bfloat16 on CUDA devices that support it, float16 on older CUDA devices, float32 on
        CPU. ``"bf16"`` and ``"off"`` work everywhere; ``"fp16"`` needs CUDA."""
        if amp not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")
        if amp == "auto":
            if device.type != "cuda":
                return cls()
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if amp == "off":
            return cls()
        if amp == "fp16":
            if device.type != "cuda":
                raise ValueError("amp 'fp16' needs a CUDA device; use 'bf16' or 'off' on the CPU")
            return cls(torch.float16, scaler=True)
        return cls(torch.bfloat16)

    @property
    def name(self) -> str:
        return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)
