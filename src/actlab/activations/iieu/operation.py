"""IIEU-B's unit at a site as one operation of the kernel layer, for training under ``torch.compile``.

``actlab::iieu_unit`` takes x_t, the producer's input, the inverse filter norms, eta and term-B's LayerNorm
parameters, and computes term-B, the patch norms and the unit's output with the same functions as eager
training (``unit_forward``); ``actlab::iieu_unit_backward`` is its gradient formula (``unit_backward`` and
the patch norms' gradient). The compiler generates no code for the unit: what it compiles at a site is
what a ReLU site has (the producer and its norm).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..kernels.composite import compute_dtype
from ..kernels.ops import dense
from .function import TermB, UnitSite, unit_backward, unit_forward
from .patches import (LinearPatches, Patches, apply_patch_grad, patch_grad_factor, patches_key, patches_of,
                      position_rows)

_NO_NORMS = (0,)  # the patch norms' shape where they are recomputed in backward rather than kept

# The operations take x_t in the layout the compiler chose and return the output and x_t's gradient in it:
# a channels-last convolution output (Inductor's choice for convolution networks) is read in place as rows
# (B * H * W, C), with no copy before or after the unit. The producer's input likewise: a channels-last map
# of an ungrouped convolution is read in place as rows of its positions' channels and its gradient returned
# in that layout; other layouts are read contiguous (copied here when they are not).
_FLEXIBLE = (torch.Tag.flexible_layout,)


def _in_layout_of(t: Tensor, like: Tensor) -> Tensor:
    """t (like's shape) with the strides ``torch.empty_like(like)`` has: t itself when it has them (a dense
    ``like``, contiguous or channels-last, whose strides t shares), else a copy."""
    dense_like = like.is_contiguous() or like.is_contiguous(memory_format=torch.channels_last)
    if dense_like and t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


def _own(t: Tensor) -> Tensor:
    """A small result as a tensor of its own: an operation's outputs may not alias each other, and the
    kernels return some per-channel gradients as views of one buffer."""
    return t.clone() if t._is_view() else t.contiguous()


def _readable(patches: Patches, x_pre: Tensor) -> Tensor:
    """x_pre as the patch norms' kernels read it: as it is where it is contiguous or a channels-last map they
    read as rows (``position_rows``), else a contiguous copy."""
    return x_pre if position_rows(patches, x_pre) is not None else x_pre.contiguous()


def _norms_shape(x_t: Tensor, x_pre: Tensor, patches: Patches) -> tuple[int, ...]:
    """The shape of the patch norms ``unit_forward`` gives, or ``_NO_NORMS`` where backward recomputes them."""
    if isinstance(patches, LinearPatches):
        shape = (*x_pre.shape[:-1], 1)
    else:
        shape = (x_t.shape[0], patches.groups, *x_t.shape[2:])
    return shape if UnitSite.keeps_norms(math.prod(shape), x_t.numel()) else _NO_NORMS


def _channels(x_t: Tensor, patches: Patches) -> int:
    return x_t.shape[-1] if isinstance(patches, LinearPatches) else x_t.shape[1]


@torch.library.custom_op("actlab::iieu_unit", mutates_args=(), tags=_FLEXIBLE)
def iieu_unit(x_t: Tensor, x_pre: Tensor, inv_w: Tensor, eta: Tensor, ln_weight: Tensor, ln_bias: Tensor,
              patches: list[int], eps: float, silence: bool,
              ln_eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """IIEU-B with term-B from x_t: (out, inv_x, sumsq, gap, nu, mean, rstd), the last six for backward
    (inv_x and sumsq empty where backward recomputes them). ``patches``: ``patches_key`` of the site."""
    site = UnitSite(patches_of(patches), eps, silence)
    x_pre = _readable(site.patches, x_pre)
    gap = site.patches.gap(x_t)
    if gap.data_ptr() == x_t.data_ptr():  # a (rows, C) Linear site in the compute dtype: GAP is x_t itself
        gap = gap.clone()
    out, inv_x, sumsq, nu, (gap, mean, rstd) = unit_forward(x_t, x_pre, inv_w, None, eta, site, TermB(gap, ln_eps),
                                                            ln_weight, ln_bias)
    if not site.keeps_norms(sumsq.numel(), x_t.numel()):
        inv_x, sumsq = sumsq.new_empty(_NO_NORMS), sumsq.new_empty(_NO_NORMS)
    saved = (t.contiguous() for t in (inv_x, sumsq, gap, nu, mean, rstd))
    return _in_layout_of(out, x_t), *saved


@iieu_unit.register_fake
def _(x_t, x_pre, inv_w, eta, ln_weight, ln_bias, patches, eps, silence, ln_eps):
    geometry = patches_of(patches)
    ct = compute_dtype(x_t)
    norms = _norms_shape(x_t, x_pre, geometry)
    rows, channels = x_t.shape[0], _channels(x_t, geometry)
    return (torch.empty_like(x_t), x_t.new_empty(norms, dtype=ct), x_t.new_empty(norms, dtype=ct),
            x_t.new_empty(rows, channels, dtype=ct), x_t.new_empty(rows, channels, dtype=ct),
            x_t.new_empty(rows, 1, dtype=ct), x_t.new_empty(rows, 1, dtype=ct))


@torch.library.custom_op("actlab::iieu_unit_backward", mutates_args=(), tags=_FLEXIBLE)
def iieu_unit_backward(grad: Tensor, x_t: Tensor, x_pre: Tensor, inv_w: Tensor, eta: Tensor, ln_weight: Tensor,
                       ln_bias: Tensor, inv_x: Tensor, sumsq: Tensor, gap: Tensor, nu: Tensor, mean: Tensor,
                       rstd: Tensor, patches: list[int], eps: float,
                       silence: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of ``iieu_unit``'s output w.r.t. (x_t, x_pre, inv_w, eta, ln_weight, ln_bias)."""
    site = UnitSite(patches_of(patches), eps, silence)
    x_pre_in = x_pre
    x_pre = _readable(site.patches, x_pre)
    norms = (inv_x, sumsq) if sumsq.numel() else (None, None)
    grads = unit_backward(grad, x_t, x_pre, inv_w, nu, eta, norms, (gap, mean, rstd), ln_weight, ln_bias, site)
    factor = patch_grad_factor(site.patches, x_pre, grads.sumsq, grads.inv, eps, silence, compute_dtype(x_t))
    grad_x_pre = apply_patch_grad(site.patches, x_pre, factor)
    return (_in_layout_of(grads.x_t, x_t), _in_layout_of(grad_x_pre, x_pre_in),
            *(_own(g) for g in (grads.inv_w, grads.eta, grads.ln_weight, grads.ln_bias)))


@iieu_unit_backward.register_fake
def _(grad, x_t, x_pre, inv_w, eta, ln_weight, ln_bias, inv_x, sumsq, gap, nu, mean, rstd, patches, eps, silence):
    return torch.empty_like(x_t), torch.empty_like(x_pre), *(dense(t) for t in (inv_w, eta, ln_weight, ln_bias))


def _setup(ctx, inputs, output):
    x_t, x_pre, inv_w, eta, ln_weight, ln_bias, patches, eps, silence, _ = inputs
    _, inv_x, sumsq, gap, nu, mean, rstd = output
    ctx.save_for_backward(x_t, x_pre, inv_w, eta, ln_weight, ln_bias, inv_x, sumsq, gap, nu, mean, rstd)
    ctx.site = (patches, eps, silence)


def _grad(ctx, grad_out, *aux_grads):
    grads = torch.ops.actlab.iieu_unit_backward(grad_out.contiguous(), *ctx.saved_tensors, *ctx.site)
    return (*(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad)), None, None, None, None)


iieu_unit.register_autograd(_grad, setup_context=_setup)


def iieu_unit_traced(x_t, x_pre, inv_w, eta, ln_weight, ln_bias, patches: Patches, eps: float, silence: bool,
                     ln_eps: float) -> Tensor:
    """IIEU-B with term-B for training under torch.compile: the operation ``actlab::iieu_unit``."""
    out, *_ = torch.ops.actlab.iieu_unit(x_t, x_pre, inv_w, eta, ln_weight, ln_bias, patches_key(patches), eps,
                                         silence, ln_eps)
    return out
