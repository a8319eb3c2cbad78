"""Where the channel dimension is: (B, C, H, W) maps, (B, C) features, tokens (B, N, C), and maps stored
channels last, (B, H, W, C) or any (B, *S, C) (the MLPs of ConvNeXt and Swin).

Ranks 2 and 3 say their layout themselves; a 4-D tensor is (B, C, H, W) unless the module was built for
an ``nhwc`` site, whose inputs of any rank >= 3 carry the channels last.
"""
from __future__ import annotations

import torch


def site_layout(shape: tuple[int, ...] | None, channels_last: bool) -> tuple[int | None, str]:
    """(channels, layout) of a site whose input had ``shape`` in the example forward: "nc" (B, C), "nlc"
    (B, N, C) tokens, "nchw" (B, C, H, W) maps, "nhwc" maps of rank >= 4 stored channels last
    (``channels_last``: the input comes from a Linear or a norm over the last dim); (None, "none") without a
    shape and (None, "<rank>-d") for any other rank."""
    if shape is None:
        return None, "none"
    if channels_last or len(shape) == 3:
        return shape[-1], ("nlc" if len(shape) == 3 else "nc" if len(shape) == 2 else "nhwc")
    if len(shape) == 4:
        return shape[1], "nchw"
    if len(shape) == 2:
        return shape[1], "nc"
    return None, f"{len(shape)}-d"


def layout_of(x: torch.Tensor, nhwc: bool = False) -> str:
    """'nc' for 2-D; 'nlc' (channels last, pooled over every position) for 3-D tokens and, with ``nhwc``,
    for any higher rank; 'nchw' for 4-D otherwise. Anything else is an error."""
    if x.dim() == 2:
        return "nc"
    if x.dim() == 3 or (nhwc and x.dim() > 3):
        return "nlc"
    if x.dim() == 4:
        return "nchw"
    expected = "(B, *S, C)" if nhwc else "(B, C, H, W), (B, C) or (B, N, C)"
    raise ValueError(f"expected a {expected} tensor, got shape {tuple(x.shape)}")


def per_channel(param: torch.Tensor, x: torch.Tensor, nhwc: bool = False) -> torch.Tensor:
    """Reshape a (C,) or (B, C) tensor so it broadcasts against ``x`` along its channel dim."""
    lay = layout_of(x, nhwc)
    if lay == "nchw":
        return param.view(1, -1, 1, 1) if param.dim() == 1 else param[:, :, None, None]
    if lay == "nlc" and param.dim() == 2:  # per-sample values over every position
        return param.view(param.shape[0], *(1,) * (x.dim() - 2), param.shape[1])
    return param


def global_pool(x: torch.Tensor, dtype: torch.dtype | None = None, nhwc: bool = False) -> torch.Tensor:
    """Mean over all positions / tokens of each sample: (B, C). A (B, C) input is returned as is."""
    lay = layout_of(x, nhwc)
    if lay == "nchw":
        return x.mean((2, 3), dtype=dtype)
    if lay == "nlc":
        return x.mean(tuple(range(1, x.dim() - 1)), dtype=dtype)
    return x if dtype is None else x.to(dtype)
