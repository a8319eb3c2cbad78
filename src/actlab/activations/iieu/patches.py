"""Patch geometry of an IIEU-B site: the receptive field of each output in the producer's input.

A Conv2d site's patch is the (C_in / groups) x kh x kw window of the producer input that the filter
sees (zero padding counted as zeros, stride and dilation honoured); a Linear site's patch is the token's
own input vector. ``sumsq`` gives the squared patch norms, from which ``invX = 1 / (||patch|| + eps)``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import backend
from ..kernels.composite import compute_dtype, inverse_norm

SILENT_RMS = 1e-6


def autocast_off(device_type: str):
    """Autocast disabled for the block; no context switch at all when it is not on (the usual case)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _same_pads(kernel: int, dilation: int) -> tuple[int, int]:
    total = dilation * (kernel - 1)
    return total // 2, total - total // 2


def _same(t: torch.Tensor) -> torch.Tensor:
    """The ``unflatten`` of a layout that is x_t's own."""
    return t


@dataclass(frozen=True)
class ConvPatches:
    """Receptive-field geometry of a Conv2d producer; channel views are (B, G, C/G, H, W)."""

    in_channels: int
    out_channels: int
    groups: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int, int, int]  # left, right, top, bottom (F.pad order)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "ConvPatches":
        if conv.padding_mode != "zeros":
            raise ValueError(f"IIEU-B supports zero-padded convolutions only, got padding_mode={conv.padding_mode!r}")
        kh, kw = conv.kernel_size
        dh, dw = conv.dilation
        if conv.padding == "same":
            top, bottom = _same_pads(kh, dh)
            left, right = _same_pads(kw, dw)
        elif conv.padding == "valid":
            top = bottom = left = right = 0
        else:
            (top, left) = conv.padding
            bottom, right = top, left
        return cls(conv.in_channels, conv.out_channels, conv.groups, (kh, kw), tuple(conv.stride),
                   (dh, dw), (left, right, top, bottom))

    @property
    def patch_numel(self) -> int:
        return self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        l, r, t, b = self.pads
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        return ((h + t + b - dh * (kh - 1) - 1) // sh + 1, (w + l + r - dw * (kw - 1) - 1) // sw + 1)

    def check(self, x_t: torch.Tensor, x_pre: torch.Tensor, site: str) -> None:
        if x_pre.dim() != 4 or x_pre.shape[1] != self.in_channels:
            raise ValueError(f"IIEU-B site {site!r}: producer input must be (B, {self.in_channels}, H, W), "
                             f"got {tuple(x_pre.shape)}")
        expected = (x_pre.shape[0], self.out_channels, *self.output_hw(*x_pre.shape[2:]))
        if tuple(x_t.shape) != expected:
            raise ValueError(f"IIEU-B site {site!r}: activation input {tuple(x_t.shape)} does not match the "
                             f"producer's output {expected}; is the producer really feeding this activation?")

    def _ones(self, ref: torch.Tensor) -> torch.Tensor:
        return ref.new_ones(self.groups, 1, *self.kernel_size)

    def _grouped_square_sum(self, x_pre: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x_pre.shape
        sq = x_pre.square()  # measured: 13x faster on CPU than linalg.vector_norm over the channel dim
        if self.groups == 1:
            return sq.sum(1, keepdim=True)
        return sq.view(b, self.groups, c // self.groups, h, w).sum(2)

    def sumsq(self, x_pre: torch.Tensor) -> torch.Tensor:
        """(B, Cin, H, W) -> squared patch norms (B, G, H', W'), in plain tensor ops."""
        return self.window_sum(self._grouped_square_sum(x_pre))

    @property
    def pointwise(self) -> bool:
        """A 1x1 convolution without padding: each patch is one position's channels (no window sum)."""
        return self.kernel_size == (1, 1) and not any(self.pads)

    @property
    def per_position(self) -> bool:
        """Pointwise with stride 1: patch (b, g, h, w) is position (h, w)'s channels of group g, and the
        patch norms have x_pre's positions."""
        return self.pointwise and self.stride == (1, 1)

    def window_sum(self, sq: torch.Tensor) -> torch.Tensor:
        """Per-position group sums of squares (B, G, H, W) -> their sums over each receptive field (B, G, H', W')."""
        if self.pointwise:
            sh, sw = self.stride
            return sq if (sh, sw) == (1, 1) else sq[:, :, ::sh, ::sw].contiguous()
        if any(self.pads):
            sq = F.pad(sq, self.pads)
        return F.conv2d(sq, self._ones(sq), stride=self.stride, dilation=self.dilation, groups=self.groups)

    def window_sum_backward(self, grad_sumsq: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """The adjoint of ``window_sum``: (B, G, H', W') -> (B, G, H, W)."""
        h, w = hw
        if self.pointwise:
            sh, sw = self.stride
            if (sh, sw) == (1, 1):
                return grad_sumsq
            grad = grad_sumsq.new_zeros(grad_sumsq.shape[0], self.groups, h, w)
            grad[:, :, ::sh, ::sw] = grad_sumsq
            return grad
        l, r, t, bt = self.pads
        padded = (grad_sumsq.shape[0], self.groups, h + t + bt, w + l + r)
        g = torch.nn.grad.conv2d_input(padded, self._ones(grad_sumsq), grad_sumsq, stride=self.stride,
                                       dilation=self.dilation, groups=self.groups)
        return g[:, :, t:t + h, l:l + w]

    def flat(self, x_t: torch.Tensor, inv_x: torch.Tensor, nu: torch.Tensor):
        """The kernels' layout of a site's tensors, without copies where the memory allows it:
        contiguous maps as planes, as they are (B, C, H', W') with inv (B, G, H', W'); channels_last maps
        of an ungrouped conv as rows (B * P, C) with inv (B * P,). Returns (x, inv, nu, unflatten) with
        ``unflatten`` taking a kernel output of x's layout back to x_t's shape and memory format."""
        b, c, h, w = x_t.shape
        if self.groups == 1 and not x_t.is_contiguous() and x_t.is_contiguous(memory_format=torch.channels_last):
            rows = x_t.permute(0, 2, 3, 1).reshape(b * h * w, c)
            return rows, inv_x.reshape(-1).contiguous(), nu.contiguous(), \
                lambda out: out.view(b, h, w, c).permute(0, 3, 1, 2)
        return x_t.contiguous(), inv_x.contiguous(), nu.contiguous(), _same

    def flat_like(self, t: torch.Tensor, x_flat: torch.Tensor) -> torch.Tensor:
        """A tensor of x_t's shape (a gradient) in the flat layout ``flat`` gave x_t."""
        if x_flat.dim() == 2:  # channels_last rows (B * H * W, C)
            return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(x_flat.shape)
        return t.contiguous()

    def gap(self, x_t: torch.Tensor) -> torch.Tensor:
        return x_t.mean((2, 3), dtype=compute_dtype(x_t))


@dataclass(frozen=True)
class LinearPatches:
    """A Linear producer: the "patch" is the token's own input vector; channel dim last, (B, *, C)."""

    in_features: int
    out_features: int

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "LinearPatches":
        return cls(linear.in_features, linear.out_features)

    @property
    def patch_numel(self) -> int:
        return self.in_features

    def check(self, x_t: torch.Tensor, x_pre: torch.Tensor, site: str) -> None:
        if x_pre.dim() < 2 or x_pre.shape[-1] != self.in_features:
            raise ValueError(f"IIEU-B site {site!r}: producer input must be (B, ..., {self.in_features}), "
                             f"got {tuple(x_pre.shape)}")
        expected = (*x_pre.shape[:-1], self.out_features)
        if tuple(x_t.shape) != expected:
            raise ValueError(f"IIEU-B site {site!r}: activation input {tuple(x_t.shape)} does not match the "
                             f"producer's output {expected}; is the producer really feeding this activation?")

    def sumsq(self, x_pre: torch.Tensor) -> torch.Tensor:
        return x_pre.square().sum(-1, keepdim=True)

    def flat(self, x_t: torch.Tensor, inv_x: torch.Tensor, nu: torch.Tensor):
        """Rows (R, C) with inv (R,) and nu per sample (S, C), or per row when nu has x_t's shape (the
        coupler's per-row term-B). Returns (x, inv, nu, unflatten) as ``ConvPatches.flat``."""
        c = x_t.shape[-1]
        rows_nu = nu.reshape(-1, c) if nu.dim() == x_t.dim() else nu
        shape = x_t.shape
        return x_t.contiguous().view(-1, c), inv_x.contiguous().view(-1), rows_nu.contiguous(), \
            lambda out: out.view(shape)

    def flat_like(self, t: torch.Tensor, x_flat: torch.Tensor) -> torch.Tensor:
        """A tensor of x_t's shape (a gradient) in the flat layout ``flat`` gave x_t."""
        return t.contiguous().view(x_flat.shape)

    def gap(self, x_t: torch.Tensor) -> torch.Tensor:
        dt = compute_dtype(x_t)
        if x_t.dim() == 2:
            return x_t.to(dt)
        return x_t.mean(tuple(range(1, x_t.dim() - 1)), dtype=dt)


Patches = ConvPatches | LinearPatches


def patches_key(patches: Patches) -> list[int]:
    """A site's geometry as a list of ints (what an operator schema can carry); ``patches_of`` inverts it."""
    if isinstance(patches, LinearPatches):
        return [0, patches.in_features, patches.out_features]
    return [1, patches.in_channels, patches.out_channels, patches.groups, *patches.kernel_size, *patches.stride,
            *patches.dilation, *patches.pads]


def patches_of(key: list[int]) -> Patches:
    """The geometry ``patches_key`` encoded."""
    if key[0] == 0:
        return LinearPatches(key[1], key[2])
    cin, cout, groups, kh, kw, sh, sw, dh, dw, *pads = key[1:]
    return ConvPatches(cin, cout, groups, (kh, kw), (sh, sw), (dh, dw), tuple(pads))


def inverse_patch_norm(sumsq: torch.Tensor, patch_numel: int, eps: float, silence: bool) -> torch.Tensor:
    """invX = 1 / (||patch|| + eps); patches with RMS < 1e-6 get 0 when ``silence``."""
    return inverse_norm(sumsq, eps, _silent_norm(patch_numel) if silence else -1.0)


def _silent_norm(patch_numel: int) -> float:
    """Patches with a norm below this have an RMS below SILENT_RMS."""
    return SILENT_RMS * math.sqrt(patch_numel)


def silent_threshold(patches, silence: bool) -> float:
    """The norm below which a patch is silenced (invX = 0), or -1 (never) for the published rule."""
    return _silent_norm(patches.patch_numel) if silence else -1.0


def patch_inverse(patches, x_pre, eps, silence, ct):
    """invX and the squared patch norms it came from, both shaped like ``patches.sumsq(x_pre)`` (ct)."""
    if isinstance(patches, LinearPatches):
        rows = x_pre.contiguous().view(-1, x_pre.shape[-1])
        inv, sumsq = backend(rows).rows_inv_norm(rows, eps, silent_threshold(patches, silence))
        shape = (*x_pre.shape[:-1], 1)
        return inv.view(shape).to(ct), sumsq.view(shape).to(ct)
    # squares summed over channels in one pass over x_pre in its own dtype (no float32 copy of the map)
    kernels = backend(x_pre, cpu_native=x_pre.is_contiguous() and ct == torch.float32)
    silent = silent_threshold(patches, silence)
    rows = position_rows(patches, x_pre)
    if rows is not None:  # a channels-last map, read in place: each position's channels are one row
        b, _, h, w = x_pre.shape
        inv, sumsq = backend(rows).rows_inv_norm(rows, eps, silent)
        sumsq = sumsq.to(ct).view(b, 1, h, w)
        if patches.per_position:
            return inv.to(ct).view(b, 1, h, w), sumsq
        return backend(sumsq).window_inv_norm(sumsq, patches, eps, silent)
    if patches.per_position:  # each patch is one position's channels: the inverse norms in the same pass
        return kernels.channel_inv_norm(x_pre, patches.groups, ct, eps, silent)
    return kernels.window_inv_norm(kernels.channel_sumsq(x_pre, patches.groups, ct), patches, eps, silent)


def position_rows(patches, x_pre: torch.Tensor) -> torch.Tensor | None:
    """x_pre's positions as rows of its channels (B * H * W, C), a view, where x_pre is a channels-last map
    (not contiguous) of an ungrouped conv site: what the rows kernels read in place. Else None."""
    if not isinstance(patches, ConvPatches) or patches.groups != 1 or x_pre.dim() != 4 or x_pre.is_contiguous():
        return None
    if not x_pre.is_contiguous(memory_format=torch.channels_last):
        return None
    return x_pre.permute(0, 2, 3, 1).reshape(-1, x_pre.shape[1])


@dataclass(frozen=True)
class NormGradFactor:
    """The patch-norm gradient factor of a Linear or per-position conv site, not yet formed: the pass that
    applies it to x_pre forms it from the squared norms and dL/d invX (``rows_norm_grad_scale``,
    ``channel_norm_grad_scale``)."""

    sumsq: torch.Tensor
    grad_inv: torch.Tensor
    eps: float
    silent: float


@dataclass(frozen=True)
class LinearSiteFactor:
    """The patch norms' and term-B's gradient of a Linear site's x_pre, not yet formed: the kernels'
    ``linear_site_input_grad`` forms it in the pass that adds it to the producer's input gradient."""

    stats: torch.Tensor
    channels: int
    eps: float
    silent: float

    def apply(self, x_pre, grad=None, into_grad: bool = False):
        """dL/d x_pre (+ ``grad``), written over ``grad`` when ``into_grad``."""
        return backend(self.stats).linear_site_input_grad(x_pre, self.stats, self.channels, self.eps, self.silent,
                                                          grad, into_grad)

def patch_grad_factor(patches, x_pre, sumsq, grad_inv, eps, silence, ct):
    """The factor f with dL/d x_pre = x_pre * f, from dL/d invX (ct): per group and position (B, G, H, W) at
    a conv site (each channel scaled by its group's factor); at a Linear or per-position conv site a
    ``NormGradFactor`` that ``apply_patch_grad`` forms in its pass."""
    silent = silent_threshold(patches, silence)
    kernels = backend(x_pre, cpu_native=x_pre.is_contiguous() and ct == torch.float32)
    grad_inv = grad_inv.contiguous().to(sumsq.dtype)
    if isinstance(patches, LinearPatches) or patches.per_position:
        return NormGradFactor(sumsq, grad_inv, eps, silent)
    return kernels.window_inv_norm_backward(sumsq, grad_inv, x_pre.shape[2:], patches, eps, silent).contiguous()


def apply_patch_grad(patches, x_pre, factor, grad=None, into_grad: bool = False):
    """dL/d x_pre = x_pre * factor, plus ``grad`` (the gradient x_pre has from elsewhere) when given, in one
    pass, in x_pre's dtype; ``into_grad``: written over ``grad`` (contiguous), which the caller owns.
    ``factor``: what ``patch_grad_factor`` returned (a ``NormGradFactor`` is formed in that pass), or a
    ``LinearSiteFactor``."""
    if isinstance(factor, LinearSiteFactor):
        return factor.apply(x_pre, grad, into_grad)
    if isinstance(factor, NormGradFactor) and isinstance(patches, LinearPatches):
        return _apply_rows_norm_grad(x_pre, factor, grad, into_grad)
    rows = position_rows(patches, x_pre)
    if isinstance(factor, NormGradFactor) and rows is not None and grad is None:  # channels-last, as it is
        b, c, h, w = x_pre.shape
        grad_rows = backend(rows).rows_norm_grad_scale(rows, factor.sumsq.reshape(-1), factor.grad_inv.reshape(-1),
                                                       factor.eps, factor.silent)
        return grad_rows.view(b, h, w, c).permute(0, 3, 1, 2)
    if isinstance(factor, NormGradFactor):
        native_ok = x_pre.is_contiguous() and (grad is None or grad.dtype == x_pre.dtype)
        return backend(x_pre, cpu_native=native_ok).channel_norm_grad_scale(
            x_pre, factor.sumsq, factor.grad_inv, factor.eps, factor.silent, grad, into_grad)
    native_ok = x_pre.is_contiguous() and factor.dtype == torch.float32 and (grad is None or grad.dtype == x_pre.dtype)
    return backend(x_pre, cpu_native=native_ok).channel_scale(x_pre, factor, grad, into_grad)


def _apply_rows_norm_grad(x_pre, factor: NormGradFactor, grad, into_grad: bool):
    """dL/d x_pre (+ grad) of a Linear site's patch norms, in one pass over the rows (K features each)."""
    rows = x_pre.contiguous().view(-1, x_pre.shape[-1])
    sumsq, grad_inv = factor.sumsq.reshape(-1).contiguous(), factor.grad_inv.reshape(-1).contiguous()
    kernels = backend(rows, cpu_native=sumsq.dtype == torch.float32 and (grad is None or grad.dtype == rows.dtype))
    add = None if grad is None else grad.view(rows.shape) if into_grad else grad.reshape(rows.shape)
    out = kernels.rows_norm_grad_scale(rows, sumsq, grad_inv, factor.eps, factor.silent, add, into_grad)
    return grad if into_grad else out.view(x_pre.shape)
