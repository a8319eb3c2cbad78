"""Where the channel dimension is, by tensor rank: (B, C, H, W), (B, C) or tokens (B, N, C)."""
from __future__ import annotations

import torch


def layout_of(x: torch.Tensor) -> str:
    """'nchw' for 4-D, 'nc' for 2-D, 'nlc' for 3-D token tensors; anything else is an error."""
    if x.dim() == 4:
        return "nchw"
    if x.dim() == 2:
        return "nc"
    if x.dim() == 3:
        return "nlc"
    raise ValueError(f"expected a (B, C, H, W), (B, C) or (B, N, C) tensor, got shape {tuple(x.shape)}")


def per_channel(param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a (C,) or (B, C) tensor so it broadcasts against ``x`` along its channel dim."""
    lay = layout_of(x)
    if param.dim() == 1:
        return param.view(1, -1, 1, 1) if lay == "nchw" else param
    # (B, C) per-sample values
    if lay == "nchw":
        return param[:, :, None, None]
    if lay == "nlc":
        return param[:, None, :]
    return param


def global_pool(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean over all positions / tokens of each sample: (B, C). A (B, C) input is returned as is."""
    lay = layout_of(x)
    if lay == "nchw":
        return x.mean((2, 3), dtype=dtype)
    if lay == "nlc":
        return x.mean(1, dtype=dtype)
    return x if dtype is None else x.to(dtype)
