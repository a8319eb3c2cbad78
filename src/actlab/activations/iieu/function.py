"""IIEU-B's computation paths, all on the kernel layer's operations (``torch.ops.actlab``):

* ``IIEUFunction``: eager training. Saves little (x_pre, which the producer keeps anyway, and small
  per-channel / per-position values), replays ``x_t`` from its maker when it can, and recomputes the rest
  in backward.
* ``unit_forward`` / ``unit_backward``: the unit's computation, shared by ``IIEUFunction`` and the
  operation ``actlab::iieu_unit`` (``operation.py``) that a module's site is under ``torch.compile``.
* ``iieu_b_traced``: the functional ``iieu_b`` (nu given) under ``torch.compile``: the custom operations
  with their registered autograd formulas, traced without a graph break.
* ``iieu_b_inference``: eager forward without autograd, on the fused kernels.
* ``iieu_b_plain``: plain tensor ops (the composite), for tracing, export and compile without grad.

Norms, term-B and the adjuster run in float32 (float64 for float64 inputs), also under autocast.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import backend, composite, native, runs_like_cuda
from ..kernels import ops as _ops  # noqa: F401  (registers torch.ops.actlab)
from ..kernels.composite import compute_dtype
from .patches import (ConvPatches, LinearPatches, LinearSiteFactor, NormGradFactor, Patches, apply_patch_grad,
                      autocast_off, inverse_patch_norm, patch_grad_factor, patch_inverse, silent_threshold)


def _autocast_as(device_type: str, enabled: bool, dtype: torch.dtype):
    """Autocast as it was for a recorded call (``enabled``, ``dtype``), switching only when needed."""
    if enabled:
        return torch.autocast(device_type, dtype=dtype)
    return autocast_off(device_type)


@dataclass(frozen=True)
class TermB:
    """Term-B computed inside the unit's autograd function, nu = sigmoid(LayerNorm(gap) * weight + bias),
    from ``gap`` = GAP(x_t) taken detached; backward adds dL/d gap, spread over the positions, to x_t's
    gradient in place and returns the LayerNorm's weight and bias gradients."""

    gap: torch.Tensor
    eps: float


@dataclass(frozen=True)
class BatchNormReplay:
    """How to recompute ``x_t = BatchNorm(c)`` in backward instead of keeping it: as the per-channel affine
    map ``x_t = c * scale + shift`` with the statistics the BatchNorm used in forward, from its input ``c``
    (which BatchNorm keeps for its own backward anyway), in ``x_t``'s dtype; equal to the forward's
    ``x_t`` to float rounding. Where ``fuses`` holds, the unit differentiates through the BatchNorm
    instead (``IIEUNormFunction``) and nothing is recomputed."""

    batch_stats: bool
    eps: float
    dtype: torch.dtype

    @classmethod
    def of_call(cls, norm: nn.Module, output: torch.Tensor) -> "BatchNormReplay":
        batch_stats = norm.training or (norm.running_mean is None and norm.running_var is None)
        return cls(batch_stats, norm.eps, output.dtype)

    def prepare(self, norm: nn.Module, c: torch.Tensor, x_t: torch.Tensor):
        """The saved tensors (c, scale, shift, hat_scale, hat_shift: x_t = c * scale + shift and
        xhat = c * hat_scale + hat_shift per channel) and, when the batch statistics give it for free, GAP(x_t)
        (B, C) in the compute dtype (else None). One pass over ``c`` in training mode, none in eval mode."""
        with torch.no_grad():
            if self.batch_stats:  # (no_grad: c is read, not differentiated)
                kernels = backend(c, cpu_native=c.is_contiguous())
                *terms, gap = kernels.batchnorm_terms(c, norm.weight, norm.bias, self.eps)
                return (c, *terms), gap if x_t.dim() == 4 else None  # GAP of a conv map
            terms = composite.running_terms(norm.running_mean, norm.running_var, norm.weight, norm.bias, self.eps,
                                            compute_dtype(x_t))
        return (c, *terms), None

    def replay(self, c, scale, shift, *hat) -> torch.Tensor:
        shape = (-1,) + (1,) * (c.dim() - 2)
        return torch.addcmul(shift.view(shape), c.to(scale.dtype), scale.view(shape)).to(self.dtype)

    def running(self, norm: nn.Module):
        """The running statistics (mean, var) the BatchNorm normalised with, or None (batch statistics)."""
        return None if self.batch_stats else (norm.running_mean, norm.running_var)

    def fuses(self, c: torch.Tensor, x_t: torch.Tensor) -> bool:
        """Whether the unit differentiates through the BatchNorm itself (``IIEUNormFunction``): a contiguous
        conv map; on the CUDA path in any float dtype (the kernels read c and the gradient in their own
        dtypes), on the CPU in float32 or float64 with x_t of c's dtype."""
        if x_t.dim() != 4 or not c.is_contiguous() or not c.is_floating_point():
            return False
        return runs_like_cuda(c) or (c.dtype == self.dtype and c.dtype in (torch.float32, torch.float64))


@dataclass(frozen=True)
class LinearReplay:
    """How to recompute ``x_t = Linear(x_pre)`` at a site without a norm, from ``x_pre`` and the weights
    (which the Linear keeps for its own backward anyway): one matmul in backward instead of a kept map."""

    autocast: bool
    autocast_dtype: torch.dtype

    @classmethod
    def of_call(cls, linear: nn.Module, output: torch.Tensor):
        """The replay of this call: from the operands the Linear's matrix product saved for its own backward
        (``ProductReplay``) where autograd recorded one, else from the Linear's input and weights."""
        product = ProductReplay.of_output(output)
        if product is not None:
            return product
        device = output.device.type
        return cls(torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

    def prepare(self, linear: nn.Module, x: torch.Tensor, x_t: torch.Tensor):
        """The saved tensors; no GAP comes with them (None)."""
        return (x, linear.weight, linear.bias), None

    def replay(self, x, weight, bias) -> torch.Tensor:
        with _autocast_as(x.device.type, self.autocast, self.autocast_dtype):
            return F.linear(x, weight, bias)

    def recompute(self, x, weight, bias) -> torch.Tensor:
        """x_t from the Linear's input and parameters (``IIEULinearFunction``)."""
        return self.replay(x, weight, bias)

    def fuses(self, x: torch.Tensor, x_t: torch.Tensor) -> bool:
        return _linear_fuses(x_t)


def _linear_fuses(x_t: torch.Tensor) -> bool:
    """Whether IIEU-B at a norm-less Linear site differentiates through the Linear itself
    (``IIEULinearFunction``): a contiguous float x_t on the CUDA path."""
    return runs_like_cuda(x_t) and x_t.is_contiguous() and x_t.is_floating_point()


@dataclass(frozen=True, eq=False)
class ProductReplay:
    """``x_t = bias + mat1 @ mat2`` recomputed from the operands autograd saved for the Linear's own
    backward (``torch.addmm``'s node, reached from x_t's ``grad_fn`` through at most a view), in the dtype
    they were multiplied in: under autocast the bfloat16 input and weight, so neither is cast again (only
    the bias). ``node``: that autograd node; its saved operands are read in
    backward, before the node itself runs (x_t's consumers run first) and frees them."""

    node: object
    shape: tuple

    @classmethod
    def of_output(cls, output: torch.Tensor) -> "ProductReplay | None":
        node = output.grad_fn
        if node is not None and node.name() == "ViewBackward0":
            node = node.next_functions[0][0]
        if node is None or node.name() != "AddmmBackward0" or node._saved_alpha != 1 or node._saved_beta != 1:
            return None
        if node._saved_mat1_sym_sizes[0] * node._saved_mat2_sym_sizes[1] != output.numel():
            return None
        if node._saved_mat1 is None or node._saved_mat2 is None:  # autograd keeps an operand only for the
            return None  # other's gradient: a first layer's input, or a frozen weight, is not kept
        return cls(node, tuple(output.shape))

    def prepare(self, linear: nn.Module, x: torch.Tensor, x_t: torch.Tensor):
        """The saved tensors (the bias; the operands stay with the node); no GAP comes with them (None)."""
        return (linear.bias,), None

    def replay(self, bias) -> torch.Tensor:
        return self.recompute(None, None, bias).view(self.shape)

    def recompute(self, x, weight, bias) -> torch.Tensor:
        """x_t's rows (R, C) from the saved operands and the Linear's ``bias`` (``x`` and ``weight`` unused)."""
        mat1, mat2 = self.node._saved_mat1, self.node._saved_mat2
        return torch.addmm(bias.to(mat1.dtype), mat1, mat2)

    def fuses(self, x: torch.Tensor, x_t: torch.Tensor) -> bool:
        return _linear_fuses(x_t)


class InputTap:
    """Carries the patch norms' gradient factor of one producer call from ``IIEUFunction``'s backward to
    ``ProducerInputTap``, which the producer's input gradient passes through next."""

    __slots__ = ("factor",)

    def __init__(self):
        self.factor: torch.Tensor | NormGradFactor | None = None


class ProducerInputTap(torch.autograd.Function):
    """Identity on the producer's input in forward. In backward it adds the patch norms' gradient
    ``x_pre * factor`` to the gradient the producer returns, in the same pass that reads it: no gradient
    map of the unit's own for autograd to add. Saves ``x_pre``, which the producer keeps anyway.

    ``grad_in_place``: the producer is a plain nn.Conv2d / nn.Linear, whose backward allocates the input
    gradient afresh, and the tap's output goes to that producer call only, so the gradient arriving here
    is held by nothing else and the sum is written over it (no allocation)."""

    @staticmethod
    def forward(ctx, x_pre, tap, patches, grad_in_place):
        ctx.tap, ctx.patches, ctx.grad_in_place = tap, patches, grad_in_place
        ctx.save_for_backward(x_pre)
        return x_pre.view_as(x_pre)

    @staticmethod
    def backward(ctx, grad):
        factor, ctx.tap.factor = ctx.tap.factor, None
        if factor is None:  # the unit did not run on this call's output, or needed no input gradient
            return grad, None, None, None
        (x_pre,) = ctx.saved_tensors
        in_place = ctx.grad_in_place and grad.is_contiguous() and grad.shape == x_pre.shape
        return apply_patch_grad(ctx.patches, x_pre, factor, grad, into_grad=in_place), None, None, None


@dataclass(frozen=True)
class TrainSite:
    """What ``IIEUFunction`` is told of its site besides the tensors it differentiates: the unit's site
    (``UnitSite``), how x_t is recomputed in backward (a ``BatchNormReplay`` / ``LinearReplay`` and the
    tensors it reads; None to keep x_t), term-B computed inside (a ``TermB``; None when nu is given) and the
    producer-input tap (an ``InputTap``, or None to return x_pre's gradient)."""

    unit: UnitSite
    replay: object | None = None
    replay_tensors: tuple = ()
    term_b: TermB | None = None
    tap: InputTap | None = None

    @classmethod
    def plain(cls, patches: Patches, eps: float = 1e-8, silence: bool = True) -> "TrainSite":
        """A site with nu given, x_t kept and x_pre's gradient returned."""
        return cls(UnitSite(patches, eps, silence))


class IIEUFunction(torch.autograd.Function):
    """out = s(x_t * inv_w * invX(x_pre) + nu) * x_t with a recomputing backward (eager training).

    ``IIEUFunction.apply(x_t, x_pre, inv_w, nu, eta, ln_weight, ln_bias, site)`` with ``site`` a
    ``TrainSite``. Saves x_pre, inv_w, nu, eta (and the squared patch norms when they are small) and x_t,
    or instead of x_t the BatchNorm / Linear input and parameters that ``site.replay`` recomputes it from.
    x_pre is kept by the producer for its own backward anyway. With ``site.tap`` x_pre's gradient goes to
    the tap as a factor instead of being returned. With ``site.term_b`` (``nu`` is then None) the function
    computes nu itself from the LayerNorm parameters ``ln_weight``, ``ln_bias`` and differentiates through
    it (else those are None). (At conv-BN sites where the unit differentiates through the BatchNorm,
    ``IIEUNormFunction`` serves instead.)
    """

    @staticmethod
    def forward(ctx, x_t, x_pre, inv_w, nu, eta, ln_weight, ln_bias, site: TrainSite):
        out, inv_x, sumsq, nu, term_b_tensors = unit_forward(x_t, x_pre, inv_w, nu, eta, site.unit, site.term_b,
                                                             ln_weight, ln_bias)
        kept_x_t = None if site.replay is not None else x_t
        norms = (inv_x, sumsq) if site.unit.keeps_norms(sumsq.numel(), x_t.numel()) else (None, None)
        ctx.save_for_backward(kept_x_t, x_pre, inv_w, nu, eta, *norms, *term_b_tensors, ln_weight, ln_bias,
                              *site.replay_tensors)
        ctx.site = site
        ctx.patches, ctx.eps, ctx.silence, ctx.tap = site.unit.patches, site.unit.eps, site.unit.silence, site.tap
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_t, x_pre, inv_w, nu, eta, inv_x, sumsq, gap, mean, rstd, ln_weight, ln_bias, *replay_tensors = \
            ctx.saved_tensors
        site: TrainSite = ctx.site
        if x_t is None:
            with torch.no_grad():
                x_t = site.replay.replay(*replay_tensors)
        term_b = (gap, mean, rstd) if site.term_b is not None else None
        grads = unit_backward(grad_out, x_t, x_pre, inv_w, nu, eta, (inv_x, sumsq), term_b, ln_weight, ln_bias,
                              site.unit, x_t_owned=site.replay is not None)
        grad_x_pre = _patch_norm_grad(ctx, x_pre, grads.sumsq, grads.inv, compute_dtype(x_t))
        return grads.x_t, grad_x_pre, grads.inv_w, grads.nu, grads.eta, grads.ln_weight, grads.ln_bias, None


@dataclass(frozen=True)
class UnitSite:
    """What the unit's computation is told of its site besides its tensors: the patch geometry, the patch
    norms' eps and the zero-patch rule."""

    patches: Patches
    eps: float
    silence: bool

    @staticmethod
    def keeps_norms(norms_numel: int, x_t_numel: int) -> bool:
        """Whether the patch norms are kept for backward (small against x_t) or recomputed (depthwise convs)."""
        return norms_numel * 16 <= x_t_numel


class UnitGrads(NamedTuple):
    """What ``unit_backward`` gives: the gradients of x_t (its shape), of the inverse patch norms (the
    norms' shape, the compute dtype), of inv_w, nu (None with term-B inside), eta and term-B's LayerNorm
    weight and bias (None without), each in its input's dtype; and the squared patch norms (recomputed
    when they were not kept), which x_pre's gradient through the norms needs."""

    x_t: torch.Tensor
    inv: torch.Tensor
    inv_w: torch.Tensor
    nu: torch.Tensor | None
    eta: torch.Tensor
    ln_weight: torch.Tensor | None
    ln_bias: torch.Tensor | None
    sumsq: torch.Tensor


def unit_forward(x_t, x_pre, inv_w, nu, eta, site: UnitSite, term_b: TermB | None = None, ln_weight=None,
                 ln_bias=None):
    """IIEU-B's output (x_t's shape and dtype, a tensor of its own) with what its backward needs:
    (out, inv_x, sumsq, nu, (gap, mean, rstd)). With ``term_b`` nu is computed here from term_b.gap and the
    LayerNorm's ``ln_weight`` and ``ln_bias`` (else it is given, and (gap, mean, rstd) are None)."""
    with autocast_off(x_t.device.type):
        ct = compute_dtype(x_t)
        term_b_tensors = (None,) * 3
        if term_b is not None:
            gap = term_b.gap
            nu, mean, rstd = backend(gap).term_b_forward(gap, ln_weight.to(ct), ln_bias.to(ct), term_b.eps)
            term_b_tensors = (gap, mean, rstd)
        inv_x, sumsq = patch_inverse(site.patches, x_pre, site.eps, site.silence, ct)
        x, inv, nu_flat, unflatten = site.patches.flat(x_t, inv_x, nu.to(ct))
        out = unflatten(backend(x).iieu_forward(x, inv, inv_w.to(ct), nu_flat, eta.to(ct)))
    return _own(out), inv_x, sumsq, nu, term_b_tensors


def _own(out: torch.Tensor) -> torch.Tensor:
    """A kernel's output as a tensor of its own where it is a view of the kernel's flat output (nothing else
    holds that output), so that a following in-place operation (a residual "+=") is allowed."""
    return out.detach() if out._is_view() else out


def unit_backward(grad_out, x_t, x_pre, inv_w, nu, eta, norms, term_b, ln_weight, ln_bias, site: UnitSite,
                  x_t_owned: bool = False) -> UnitGrads:
    """The gradients of ``unit_forward`` from dL/d out, all but x_pre's (which ``patch_grad_factor`` forms
    from ``grads.inv`` and ``grads.sumsq``). ``norms``: (inv_x, sumsq) as forward gave them, or (None, None)
    to recompute them; ``term_b``: forward's (gap, mean, rstd), or None where nu was given. ``x_t_owned``:
    x_t is the caller's temporary (a replay), which the CPU kernels may overwrite with its gradient."""
    with autocast_off(grad_out.device.type):
        ct = compute_dtype(x_t)
        inv_x, sumsq = norms
        sumsq, inv_x, (x, inv, nu_flat, unflatten), go, kernels = _flat_inputs(site, x_t, x_pre, sumsq, inv_x, nu,
                                                                               grad_out, ct)
        args = (go, x, inv, inv_w.to(ct), nu_flat, eta.to(ct))
        if kernels is native:  # a replayed x_t (or a layout copy) is ours: grad_x is written over it
            own = x_t_owned or x.data_ptr() != x_t.data_ptr()
            grad_x, grad_inv, grad_w, grad_nu, grad_eta = native.iieu_backward(*args, grad_into_x=own)
        else:
            grad_x, grad_inv, grad_w, grad_nu, grad_eta = kernels.iieu_backward(*args)
        grad_ln = (None, None)
        if term_b is not None:  # term-B's path: dL/d GAP(x_t), the same for every position of a sample
            gap, mean, rstd = term_b
            grad_ln = kernels.term_b_backward_into_(grad_x, _shaped(grad_nu, nu.shape), nu, gap, mean, rstd,
                                                    ln_weight.to(ct), ln_bias.to(ct), nu.numel() / x_t.numel())
            grad_ln = [g.to(t.dtype) for g, t in zip(grad_ln, (ln_weight, ln_bias))]
    grad_nu = None if term_b is not None else grad_nu.reshape(nu.shape).to(nu.dtype)
    return UnitGrads(unflatten(grad_x), _shaped(grad_inv, inv_x.shape), _shaped(grad_w, inv_w.shape).to(inv_w.dtype),
                     grad_nu, grad_eta.to(eta.dtype), *grad_ln, sumsq)


def _shaped(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """t in ``shape``: t itself when it has it (no view made), else a reshape."""
    return t if t.shape == shape else t.reshape(shape)


def _flat_inputs(site, source, x_pre, sumsq, inv_x, nu, grad_out, ct):
    """The backward kernels' inputs: the squared patch norms and invX (recomputed when not kept), the flat
    layout of ``source`` (x_t) with invX and nu, grad_out in that layout, and the
    kernels for it. ``site``: a ``UnitSite`` (or an autograd context) with ``patches``, ``eps`` and
    ``silence``."""
    if sumsq is None:
        inv_x, sumsq = patch_inverse(site.patches, x_pre, site.eps, site.silence, ct)
    flat = site.patches.flat(source, inv_x, nu.to(ct))
    go = site.patches.flat_like(grad_out, flat[0])
    return sumsq, inv_x, flat, go, backend(flat[0], cpu_native=go.dtype == flat[0].dtype)


def _patch_norm_grad(ctx, x_pre, sumsq, grad_inv, ct, x_pre_input: int = 1):
    """dL/d x_pre through the patch norms, or None: handed to the producer-input tap when there is one.
    ``ctx``: an autograd context with ``patches``, ``eps``, ``silence`` and ``tap``; x_pre is its input
    number ``x_pre_input``."""
    if not (ctx.needs_input_grad[x_pre_input] or ctx.tap is not None):
        return None
    factor = patch_grad_factor(ctx.patches, x_pre, sumsq, grad_inv, ctx.eps, ctx.silence, ct)
    if ctx.tap is not None:
        ctx.tap.factor = factor
        return None
    return apply_patch_grad(ctx.patches, x_pre, factor)


@dataclass(frozen=True)
class NormSite:
    """What ``IIEUNormFunction`` is told of its site besides its tensors: the patch geometry and eps,
    the zero-patch rule, the filter norms' eps, the BatchNorm's eps and running statistics (mean, var) when
    it normalised with them (else None), term-B's LayerNorm eps, and the producer-input tap (or None)."""

    patches: ConvPatches
    eps: float
    silence: bool
    filter_eps: float
    bn_eps: float
    running: tuple | None
    ln_eps: float
    tap: InputTap | None


class IIEUNormFunction(torch.autograd.Function):
    """IIEU-B at a conv-BN site in eager training, differentiated through the BatchNorm and term-B itself.

    x_t = BN(c) arrives with the BatchNorm's input c and the producer's ``filters``. Forward computes the
    site's statistics in one buffer (the kernels' ``bn_site_stats``: one pass over c for the BatchNorm's
    per-channel coefficients and GAP(x_t), the filters' inverse norms inv_w, then term-B
    nu = sigmoid(LayerNorm(GAP))), the patch norms and the unit's output; backward (``bn_site_backward``:
    two passes over c and the incoming gradient) returns the gradients of c, of the filters (through
    inv_w), of the BatchNorm's and the LayerNorm's weight and bias and of eta directly (none for x_t: the
    BatchNorm's own backward then receives no gradient and computes nothing), and sends x_pre's to the
    producer-input tap. Saves c (which the BatchNorm keeps anyway), x_pre (the producer's), the
    statistics and the parameters."""

    @staticmethod
    def forward(ctx, x_t, c, x_pre, filters, eta, ln_weight, ln_bias, norm_weight, norm_bias, site: NormSite):
        with autocast_off(c.device.type):
            ct = compute_dtype(c)
            kernels = backend(c)
            stats = kernels.bn_site_stats(c, norm_weight, norm_bias, site.bn_eps, site.running, ln_weight.to(ct),
                                          ln_bias.to(ct), site.ln_eps, filters.contiguous(), site.filter_eps)
            inv_x, sumsq = patch_inverse(site.patches, x_pre, site.eps, site.silence, ct)
            out = kernels.bn_site_forward(x_t.contiguous(), inv_x.contiguous(), eta.to(ct), stats)
        norms = (inv_x, sumsq) if UnitSite.keeps_norms(sumsq.numel(), x_t.numel()) else (None, None)
        ctx.save_for_backward(c, x_pre, filters, eta, ln_weight, stats, *norms)
        ctx.patches, ctx.eps, ctx.silence, ctx.tap, ctx.batch_stats, ctx.filter_eps = (
            site.patches, site.eps, site.silence, site.tap, site.running is None, site.filter_eps)
        return _own(out)

    @staticmethod
    def backward(ctx, grad_out):
        c, x_pre, filters, eta, ln_weight, stats, inv_x, sumsq = ctx.saved_tensors
        with autocast_off(c.device.type):
            ct = compute_dtype(c)
            if sumsq is None:
                inv_x, sumsq = patch_inverse(ctx.patches, x_pre, ctx.eps, ctx.silence, ct)
            go = grad_out.contiguous()
            kernels = backend(c, cpu_native=go.dtype == c.dtype)
            grads = kernels.bn_site_backward(go, c, inv_x.contiguous(), eta.to(ct), stats, ln_weight.to(ct),
                                             ctx.batch_stats)
            grad_x_pre = _patch_norm_grad(ctx, x_pre, sumsq, grads.inv, ct, x_pre_input=2)
            needed = ctx.needs_input_grad
            grad_filters = kernels.bn_site_filter_grad(filters, stats, grads.inv_w, ctx.filter_eps) if needed[3] \
                else None
        return (None, grads.c, grad_x_pre, grad_filters, grads.eta.to(eta.dtype), grads.ln_weight.to(ln_weight.dtype),
                grads.ln_bias, grads.norm_weight if needed[7] else None, grads.norm_bias if needed[8] else None, None)


@dataclass(frozen=True)
class LinearSite:
    """What ``IIEULinearFunction`` is told of its site besides its tensors: the patch geometry, the rows'
    norm eps and silencing threshold (``silent_threshold``), the filter norms' eps, term-B's LayerNorm eps,
    the producer-input tap (or None) and how x_t is recomputed in backward (a ``LinearReplay`` or
    ``ProductReplay``)."""

    patches: LinearPatches
    eps: float
    silent: float
    filter_eps: float
    ln_eps: float
    tap: InputTap | None
    replay: object


class IIEULinearFunction(torch.autograd.Function):
    """IIEU-B at a norm-less Linear site in eager training, x_t = Linear(x_pre), differentiated through the
    Linear's GAP itself.

    GAP(x_t) is the Linear of the mean of each sample's rows of x_pre, so forward computes the site's
    statistics in one buffer (the kernels' ``linear_site_stats``: the rows' norms and means of x_pre, GAP,
    term-B, the filters' norms) without reading x_t, then the unit's output. Backward recomputes x_t (one
    matrix product, from the operands the Linear keeps), and term-B's gradient goes to the filters, the
    bias and x_pre (through the tap, in the pass that adds the patch norms' gradient) instead of being
    spread over x_t's. Saves x_pre (the Linear's), the statistics and the parameters."""

    @staticmethod
    def forward(ctx, x_t, x_pre, filters, bias, eta, ln_weight, ln_bias, site: LinearSite):
        with autocast_off(x_t.device.type):
            ct = compute_dtype(x_t)
            kernels = backend(x_t)
            stats = kernels.linear_site_stats(x_pre.contiguous(), x_t.dtype, filters.contiguous(), bias,
                                              ln_weight.to(ct), ln_bias.to(ct), site.ln_eps, site.eps, site.silent,
                                              site.filter_eps)
            out = kernels.linear_site_forward(x_t.contiguous(), eta.to(ct), stats, x_pre.shape[-1])
        ctx.save_for_backward(x_pre, filters, bias, eta, ln_weight, stats)
        ctx.site = site
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_pre, filters, bias, eta, ln_weight, stats = ctx.saved_tensors
        site = ctx.site
        with autocast_off(grad_out.device.type):
            ct = compute_dtype(grad_out)
            with torch.no_grad():
                x_t = site.replay.recompute(x_pre, filters, bias)
            kernels = backend(x_t)
            grads = kernels.linear_site_backward(grad_out.contiguous(), x_t, eta.to(ct), stats, filters.contiguous(),
                                                 bias is not None, ln_weight.to(ct), site.filter_eps)
            factor = LinearSiteFactor(stats, filters.shape[0], site.eps, site.silent)
        grad_x_pre = None
        if site.tap is not None:
            site.tap.factor = factor
        elif ctx.needs_input_grad[1]:
            grad_x_pre = factor.apply(x_pre)
        needed = ctx.needs_input_grad
        return (_shaped(grads.x, grad_out.shape), grad_x_pre, grads.filters.to(filters.dtype) if needed[2] else None,
                grads.bias.to(bias.dtype) if needed[3] else None, grads.eta.to(eta.dtype),
                grads.ln_weight.to(ln_weight.dtype), grads.ln_bias.to(ln_weight.dtype), None)


def _op_forward(patches, x_t, inv_x, inv_w, nu, eta):
    """The fused forward operation on the site's flat layout, back in x_t's shape."""
    x, inv, nu_flat, unflatten = patches.flat(x_t, inv_x, nu)
    return unflatten(torch.ops.actlab.iieu_forward(x, inv, inv_w.contiguous(), nu_flat, eta.contiguous()))


def iieu_b_inference(x_t, x_pre, inv_w, nu, eta, patches, eps=1e-8, silence=True):
    """Eager IIEU-B without autograd, on the fused kernels."""
    with autocast_off(x_t.device.type):
        ct = compute_dtype(x_t)
        inv_x, _ = patch_inverse(patches, x_pre, eps, silence, ct)
        return _op_forward(patches, x_t, inv_x, inv_w.to(ct), nu.to(ct), eta.to(ct))


def iieu_b_traced(x_t, x_pre, inv_w, nu, eta, patches, eps=1e-8, silence=True):
    """IIEU-B for training under torch.compile. The inverse patch norms are the kernel layer's
    operations (their gradient is 0 at a zero patch, where the plain ops' chain rule gives NaN); the
    elementwise part is the composite, which the compiler fuses into kernels of its own (Triton on GPUs).
    With the fused operation there instead, Inductor returned wrong gradients for a 9-block ResNet on
    CPU while the same graph ran correctly without Inductor; the composite trains correctly."""
    with autocast_off(x_t.device.type):
        ct = compute_dtype(x_t)
        silent = silent_threshold(patches, silence)
        if isinstance(patches, LinearPatches):
            rows = x_pre.reshape(-1, x_pre.shape[-1]).contiguous()
            inv, _ = torch.ops.actlab.rows_inv_norm(rows, eps, silent)
            inv_x = inv.to(ct).view(*x_pre.shape[:-1], 1)
        else:
            inv_x = torch.ops.actlab.inv_norm(patches.sumsq(x_pre.to(ct)), eps, silent)
        x, inv, nu_flat, unflatten = patches.flat(x_t, inv_x, nu.to(ct))
        return unflatten(composite.iieu_forward(x, inv, inv_w.to(ct), nu_flat, eta.to(ct)))


def iieu_b_plain(x_t, x_pre, inv_w, nu, eta, patches, eps=1e-8, silence=True):
    """IIEU-B with plain tensor ops (the composite): for tracing, export and compile without grad.

    Shapes: x_t (B, C, H', W') or (B, *, C); x_pre the producer's input; inv_w (C,); nu (B, C); eta (C,).
    """
    with autocast_off(x_t.device.type):
        ct = compute_dtype(x_t)
        inv_x = inverse_patch_norm(patches.sumsq(x_pre.to(ct)), patches.patch_numel, eps, silence)
        x, inv, nu_flat, unflatten = patches.flat(x_t, inv_x, nu.to(ct))
        return unflatten(composite.iieu_forward(x, inv, inv_w.to(ct), nu_flat, eta.to(ct)))


def iieu_b_rho(x_t, x_pre, inv_w, nu, patches, eps=1e-8, silence=True):
    """rho = x_t * inv_w * invX + nu (the II-score before the adjuster), x_t's shape, compute dtype."""
    ct = compute_dtype(x_t)
    inv_x = inverse_patch_norm(patches.sumsq(x_pre.to(ct)), patches.patch_numel, eps, silence)
    x, inv, nu_flat, unflatten = patches.flat(x_t.to(ct), inv_x, nu.to(ct))
    return unflatten(composite.iieu_rho(x, inv, inv_w.to(ct), nu_flat).contiguous())


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.5
    return bool(is_exporting and is_exporting())


def path() -> str:
    """Which computation serves the current call: "train" (eager, the memory-saving autograd function),
    "traced_train" (torch.compile with autograd), "plain" (export, TorchScript tracing, compile without
    autograd) or "inference" (eager without autograd)."""
    if torch.jit.is_tracing() or _exporting():
        return "plain"
    if torch.compiler.is_compiling():
        return "traced_train" if torch.is_grad_enabled() else "plain"
    return "train" if torch.is_grad_enabled() else "inference"


def iieu_b(x_t, x_pre, inv_w, nu, eta, patches, eps=1e-8, silence=True):
    """Functional IIEU-B given term-B ``nu`` and the inverse filter norms ``inv_w``."""
    mode = path()
    if mode == "train":
        return IIEUFunction.apply(x_t, x_pre, inv_w, nu, eta, None, None, TrainSite.plain(patches, eps, silence))
    return PATHS[mode](x_t, x_pre, inv_w, nu, eta, patches, eps, silence)


PATHS = {"traced_train": iieu_b_traced, "plain": iieu_b_plain, "inference": iieu_b_inference}
