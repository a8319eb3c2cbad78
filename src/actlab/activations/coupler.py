"""Dynamic Coupler of IIEU-DC: fuses a residual block's main and shortcut branches.

    a        = LN_2C([GAP(main), GAP(shortcut)]) -> rows a_1, a_2 (C each)   (LN w=1, b=0)
    h_i      = W1 a_i                       (C -> C/r, no bias, shared)
    h_i'     = IIEU(h_i) at the linear site (x_pre = a_i, filter W1); term-B normalises each row h_i by its
               own mean and *unbiased* standard deviation plus 1e-6 (as published), one affine per row
    z        = LN_2C([W2 h_1', W2 h_2'])    (C/r -> C, no bias; LN w=0.01, b=0)
    l1, l2   = softmax over the two rows, per channel
    out      = l1 * main + l2 * shortcut
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .iieu.patches import LinearPatches, silent_threshold
from .kernels import backend, composite, native
from .kernels.composite import CouplerNet, row_standardize  # noqa: F401  (row_standardize: public here)
from .layout import per_channel


class CouplerIIEU(nn.Module):
    """IIEU over the hidden features of both rows (B, 2, C/r): shared ``eta``, per-row term-B affine."""

    # parameters the published code keeps multi-dimensional ((1, 1, h), (1, 2, h)), so that timm's rule
    # "decay all but 1-D parameters and biases" decays them (weight_decay_rule="timm")
    PUBLISHED_MULTI_DIM = ("eta", "norm_weight", "norm_bias")

    def __init__(self, hidden: int, eta_init: float = 0.01, norm_init: float = 0.01, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.eta = nn.Parameter(torch.full((hidden,), float(eta_init)))
        self.norm_weight = nn.Parameter(torch.full((2, hidden), float(norm_init)))
        self.norm_bias = nn.Parameter(torch.zeros(2, hidden))


def _kernels_for(main: torch.Tensor, shortcut: torch.Tensor):
    """C++ kernels for float32 CPU maps in (B, C, *S) order, contiguous; else the composite (or Triton)."""
    native_ok = main.dim() != 3 and main.is_contiguous() and shortcut.is_contiguous() and shortcut.dtype == main.dtype
    return backend(main, cpu_native=native_ok)


class _CoupledSum(torch.autograd.Function):
    """out = l1 * main + l2 * shortcut in eager training, with the fusion weights' gradient path folded in.

    The weights come from the branches' GAPs through the small weight network (``CouplerNet``); backward
    turns dL/d(l1, l2) into dL/d GAP and the network's parameter gradients (the kernels'
    ``coupler_weights_backward``) and adds dL/d GAP, spread over the positions, to each branch's gradient
    in the pass that scales it: one pass for the sums, one for both branch gradients, and no full-size map
    of the pooling's own.

    Saves ``out`` and ``shortcut``, not ``main``: in a residual network ``out`` is the next block's input,
    which its first convolution keeps anyway, and an identity ``shortcut`` is this block's input, which its
    own first convolution keeps. The sum of grad * main is recovered as (sum of grad * out - l2 * sum of
    grad * shortcut) / l1, per (sample, channel).
    """

    @staticmethod
    def forward(ctx, main, shortcut, net, *params):
        kernels = _kernels_for(main, shortcut)
        pooled = kernels.coupler_pool(main, shortcut)
        lam = kernels.coupler_weights(pooled, net)
        out = kernels.coupler_forward(main, shortcut, lam)
        ctx.save_for_backward(out, shortcut, pooled, lam)
        ctx.net, ctx.kernels = net, kernels
        return out

    @staticmethod
    def backward(ctx, grad):
        out, shortcut, pooled, lam = ctx.saved_tensors
        kernels = ctx.kernels
        if kernels is native:
            grad = grad.contiguous()
        grad_lam = kernels.coupler_weight_grads(grad, out, shortcut, lam)
        positions = grad.shape[1] if grad.dim() == 3 else math.prod(grad.shape[2:])
        grad_pooled, grad_params = kernels.coupler_weights_backward(pooled, ctx.net, grad_lam, 1.0 / positions)
        grad_main, grad_shortcut = kernels.coupler_grads(grad, lam, grad_pooled)
        return grad_main, grad_shortcut, None, *grad_params


class DynamicCoupler(nn.Module):
    """Replace ``main + shortcut`` by ``l1 * main + l2 * shortcut`` with per-sample channel weights.

    Args:
        channels: C of both branches.
        reduction: r; the hidden width is max(C // r, 1) (published: 16 in the ResNets, 4 in MobileNetV2).
        eta_init: initial threshold of the inner IIEU (published: 0.01 in the ResNets, 0.05 in MobileNetV2).
    Shapes: main, shortcut (B, C, H, W), or tokens (B, N, C), or (B, C) -> same shape as ``main``.
    """

    def __init__(self, channels: int, reduction: int = 16, eta_init: float = 0.01):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.channels = channels
        self.in_norm = nn.LayerNorm(2 * channels, eps=1e-6)
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.act = CouplerIIEU(hidden, eta_init=eta_init)
        self.fc2 = nn.Linear(hidden, channels, bias=False)
        self.out_norm = nn.LayerNorm(2 * channels, eps=1e-6)
        nn.init.kaiming_normal_(self.fc1.weight, mode="fan_out")
        nn.init.kaiming_normal_(self.fc2.weight, mode="fan_out")
        nn.init.constant_(self.out_norm.weight, 0.01)
        nn.init.zeros_(self.out_norm.bias)

    def network(self) -> CouplerNet:
        """The weight network as the kernels take it: this module's parameters themselves."""
        return CouplerNet(self.in_norm.weight, self.in_norm.bias, self.fc1.weight, self.act.eta, self.act.norm_weight,
                          self.act.norm_bias, self.fc2.weight, self.out_norm.weight, self.out_norm.bias,
                          silent=silent_threshold(LinearPatches.from_linear(self.fc1), True),
                          ln_eps=self.in_norm.eps, eps=self.act.eps)

    def _check(self, main: torch.Tensor, shortcut: torch.Tensor) -> None:
        if main.shape != shortcut.shape:
            raise ValueError(f"DynamicCoupler: main {tuple(main.shape)} and shortcut {tuple(shortcut.shape)} differ")
        channels = main.shape[-1] if main.dim() == 3 else main.shape[1]
        if channels != self.channels:
            raise ValueError(f"DynamicCoupler: expected {self.channels} channels, got {channels}")

    def pooled(self, main: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        """[GAP(main), GAP(shortcut)] (B, 2C) in float32 (float64 for float64 inputs)."""
        self._check(main, shortcut)
        return composite.coupler_pool(main, shortcut)

    def weights_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, 2C) pooled branches -> fusion weights (B, 2, C) in pooled's dtype; rows sum to 1."""
        return composite.coupler_weights(pooled, self.network())

    def weights(self, main: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        """Fusion weights (B, 2, C), in float32 (float64 for float64 inputs); rows sum to 1."""
        return self.weights_from_pooled(self.pooled(main, shortcut))

    def forward(self, main: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
            self._check(main, shortcut)
            net = self.network()
            return _CoupledSum.apply(main, shortcut, net, *net.tensors())
        lam = self.weights(main, shortcut).to(main.dtype)
        return per_channel(lam[:, 0], main) * main + per_channel(lam[:, 1], shortcut) * shortcut
