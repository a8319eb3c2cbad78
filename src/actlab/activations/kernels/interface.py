"""The kernel-backend interface: the operations every backend module implements, with these parameters
(in this order; a backend may add parameters with defaults after them).

Three modules implement it: ``composite`` (plain PyTorch, the reference), ``native`` (C++ CPU kernels;
operations without a kernel of their own say so and run the composite) and ``triton_kernels`` (CUDA, or
CPU tensors under Triton's interpreter). ``backend(x)`` in ``__init__.py`` chooses one per tensor; what
each operation computes is documented on its composite implementation. ``tests/activations/
test_kernel_interface.py`` checks that every backend implements every operation.
"""
from __future__ import annotations

from typing import Protocol

import torch


class KernelBackend(Protocol):
    """One implementation of every fused operation of IIEU-B, IIEU-DC and DPA."""

    # IIEU-B's unit

    def iieu_forward(self, x, inv, inv_w, nu, eta):
        """out = s(rho) * x with rho = x * inv_w * inv + nu, s(r) = r above eta, eta * exp(r - eta) below."""
        ...

    def iieu_backward(self, grad_out, x, inv, inv_w, nu, eta):
        """Gradients of ``iieu_forward`` with respect to x, inv, inv_w, nu and eta, each shaped like its input."""
        ...

    def term_b_forward(self, gap, weight, bias, eps: float):
        """IIEU-B's term-B over the channels of each sample."""
        ...

    def term_b_backward_into_(self, grad_x, grad_nu, nu, gap, mean, rstd, weight, bias, scale: float):
        """Term-B's backward added into x_t's gradient."""
        ...

    # Norms of filters and patches

    def rows_inv_norm(self, x, eps: float, silent: float):
        """The inverse norm of each row of x (R, *), 1 / (||x_r|| + eps), and the squared norms."""
        ...

    def rows_inv_norm_backward(self, x, sumsq, grad_inv, eps: float, silent: float):
        """dL/d x (x's shape and dtype) of ``rows_inv_norm`` from dL/d inv."""
        ...

    def rows_norm_grad_scale(self, x, sumsq, grad_inv, eps: float, silent: float, add=None, into_add: bool = False):
        """``rows_inv_norm_backward`` plus ``add`` (x's shape) when given, written over ``add`` when
        ``into_add``."""
        ...

    def channel_sumsq(self, x, groups: int, ct: torch.dtype):
        """Sum of squares over each group's channels."""
        ...

    def channel_inv_norm(self, x, groups: int, ct: torch.dtype, eps: float, silent: float):
        """Inverse norms of each position's group of channels (a pointwise producer's patches)."""
        ...

    def channel_scale(self, x, scale, add=None, into_add: bool = False):
        """x (B, C, *S) times its group's ``scale`` (B, G, *S) at every position, computed in scale's dtype,
        returned in x's; plus ``add`` (x's shape) when given, written over ``add`` when ``into_add``."""
        ...

    def channel_norm_grad_scale(self, x, sumsq, grad_inv, eps: float, silent: float, add=None, into_add: bool = False):
        """dL/d x of ``channel_inv_norm`` from dL/d inv."""
        ...

    def window_inv_norm(self, sq, window, eps: float, silent: float):
        """Inverse patch norms of a convolution."""
        ...

    def window_inv_norm_backward(self, sumsq, grad_inv, hw, window, eps: float, silent: float):
        """The factor f (B, G, H, W) with dL/d x_pre = x_pre * f from dL/d inv of ``window_inv_norm``."""
        ...

    # IIEU-B at a conv-BatchNorm site

    def batchnorm_terms(self, c, weight, bias, eps: float):
        """What IIEU-B needs of a training-mode BatchNorm of c (B, C, *S) with affine parameters ``weight`` and
        ``bias`` (C,) or None."""
        ...

    def bn_site_stats(self, c, weight, bias, eps: float, running, ln_weight, ln_bias, ln_eps: float, filters,
                      filter_eps: float):
        """What IIEU-B at a conv-BN site needs of its BatchNorm (on c (B, C, *S), with affine ``weight`` and
        ``bias`` or None; ``running`` = (running_mean, running_var) for an eval-mode BatchNorm, else None for
        the batch statistics), of its term-B (LayerNorm ``ln_weight``, ``ln_bias``, ``ln_eps``) and of the
        producer's ``filters`` (C, ...) (``rows_inv_norm`` with ``filter_eps``), packed as ``site_stats_parts``
        reads them."""
        ...

    def bn_site_forward(self, x, inv, eta, stats):
        """IIEU-B's output at a conv-BN site (``forward``, by default this module's ``iieu_forward``, with the
        site's nu and inv_w) on planes x (B, C, *S)."""
        ...

    def bn_site_backward(self, grad_out, c, inv, eta, stats, ln_weight, batch_stats: bool):
        """IIEU-B's backward at a conv-BN site through the BatchNorm and term-B, from ``bn_site_stats``."""
        ...

    def bn_site_filter_grad(self, filters, stats, grad_inv_w, filter_eps: float):
        """dL/d filters (their shape and dtype) through the site's inverse filter norms, from dL/d inv_w
        (``backward``, by default this module's ``rows_inv_norm_backward``, with the kept squared norms)."""
        ...

    # IIEU-B at a norm-less Linear site

    def linear_site_stats(self, x_pre, product_dtype, weight, bias, ln_weight, ln_bias, ln_eps: float, eps: float,
                          silent: float, filter_eps: float):
        """What IIEU-B needs at a site x_t = Linear(x_pre) (``weight`` (C, K), ``bias`` (C,) or None, multiplied
        in ``product_dtype``, x_t's dtype) with x_pre (S, *, K), packed as ``linear_site_parts`` reads them."""
        ...

    def linear_site_forward(self, x, eta, stats, k: int):
        """IIEU-B's output at a Linear site (``forward``, by default this module's ``iieu_forward``, on x's rows
        with the site's statistics); x (S, *, C), x_pre had ``k`` features."""
        ...

    def linear_site_backward(self, grad_out, x, eta, stats, weight, has_bias: bool, ln_weight, filter_eps: float):
        """IIEU-B's backward at a Linear site (``backward``, by default this module's ``iieu_backward``, on the
        rows), term-B's through GAP(x_t) = mean(x_pre) @ weight^T + bias taken into the filters', the bias' and
        x_pre's gradients instead of x_t's."""
        ...

    def linear_site_input_grad(self, x_pre, stats, c: int, eps: float, silent: float, add=None, into_add: bool = False):
        """dL/d x_pre (x_pre's shape and dtype) from what ``linear_site_backward`` wrote into the statistics."""
        ...

    # IIEU-DC's Dynamic Coupler

    def coupler_fusion(self, main, shortcut, net):
        """The Dynamic Coupler's fusion out = l1 * main + l2 * shortcut with (l1, l2) from the pooled branches
        through the weight network."""
        ...

    def coupler_fusion_backward(self, grad, out, shortcut, state, net):
        """dL/d main, dL/d shortcut and dL/d each of ``net.tensors()`` (a tuple) from dL/d out, without
        ``main``."""
        ...

    # DPA

    def pass_mask(self, x, tau: float):
        """TAU's gradient mask x >= tau (a NaN does not pass), bit-packed."""
        ...

    def masked_grad(self, grad, passes):
        """grad where the packed mask ``passes`` (of grad's shape) is set, else 0."""
        ...

    def tau_pool(self, x, tau: float, tokens: bool):
        """TAU (0 if x < tau else x) with the mean of x over each sample's positions or tokens."""
        ...

    def tau_pool_backward(self, grad_out, passes, grad_v, tokens: bool, cls: bool = False):
        """dL/d x of ``tau_pool``."""
        ...

    def dpa_forward(self, x, tau: float, tokens: bool, memories=None, labels=None, count=None, cls: bool = False):
        """One DPA site's forward."""
        ...

    def dpa_mask(self, v, value_rows, grad_memory, labels, tau: float, gather: bool):
        """DPA's irrelevant entries (B, C) bool."""
        ...

    def ema_update_(self, memory, labels, values, alpha: float, order=None, signs: bool = False, after: bool = True,
                    enabled=None):
        """DPA's per-class memory rule ``memory[y_i] += alpha * (values_i - memory[y_i])`` for i in batch order,
        in place; a sample whose values are not all finite is left out."""
        ...
