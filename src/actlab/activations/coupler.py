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

import torch
import torch.nn as nn

from .iieu.function import path
from .iieu.patches import LinearPatches, silent_threshold
from .kernels import composite, ops
from .kernels.composite import CouplerNet, row_standardize  # noqa: F401  (row_standardize: public here)
from .layout import per_channel


class CouplerIIEU(nn.Module):
    """The parameters of the IIEU over the hidden features of both rows (B, 2, C/r): a shared ``eta`` and
    a per-row term-B affine. The computation is ``CouplerNet``'s (the kernel layer), which reads them."""

    # parameters the published code keeps multi-dimensional ((1, 1, h), (1, 2, h)), so that timm's rule
    # "decay all but 1-D parameters and biases" decays them (weight_decay_rule="timm")
    PUBLISHED_MULTI_DIM = ("eta", "norm_weight", "norm_bias")

    def __init__(self, hidden: int, eta_init: float = 0.01, norm_init: float = 0.01, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.eta = nn.Parameter(torch.full((hidden,), float(eta_init)))
        self.norm_weight = nn.Parameter(torch.full((2, hidden), float(norm_init)))
        self.norm_bias = nn.Parameter(torch.zeros(2, hidden))


class _CoupledSum(torch.autograd.Function):
    """out = l1 * main + l2 * shortcut in eager training, with the fusion weights' gradient path folded in.

    The weights come from the branches' GAPs through the small weight network (``CouplerNet``); backward
    turns dL/d(l1, l2) into dL/d GAP and the network's parameter gradients and adds dL/d GAP, spread over
    the positions, to each branch's gradient in the pass that scales it: one pass for the sums, one for
    both branch gradients, and no full-size map of the pooling's own (the kernel layer's
    ``coupler_fusion`` and ``coupler_fusion_backward``, which ``torch.compile`` sees as one operation).

    Saves ``out`` and ``shortcut``, not ``main``: in a residual network ``out`` is the next block's input,
    which its first convolution keeps anyway, and an identity ``shortcut`` is this block's input, which its
    own first convolution keeps. The sum of grad * main is recovered as (sum of grad * out - l2 * sum of
    grad * shortcut) / l1, per (sample, channel).
    """

    @staticmethod
    def forward(ctx, main, shortcut, net, *params):
        out, state = ops.coupler_fusion(main, shortcut, net)
        ctx.save_for_backward(out, shortcut, state)
        ctx.net = net
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_main, grad_shortcut, grad_params = ops.coupler_fusion_backward(grad, *ctx.saved_tensors, ctx.net)
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

    def no_weight_decay(self) -> set[str]:
        """All of the coupler's parameters (timm's convention): it is part of the activation, whose weight
        network starts from a fixed point (out_norm at 0.01) that decay would move."""
        return {name for name, _ in self.named_parameters()}

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
        mode = path()  # the same computation paths as IIEU-B's
        if mode in ("train", "traced_train"):
            self._check(main, shortcut)
            net = self.network()
            if mode == "traced_train":  # one operation with its gradient formula for the compiler
                return torch.ops.actlab.coupler(main, shortcut, *net.tensors(), net.silent, net.ln_eps, net.row_eps,
                                                net.eps)[0]
            return _CoupledSum.apply(main, shortcut, net, *net.tensors())
        lam = self.weights(main, shortcut).to(main.dtype)
        return per_channel(lam[:, 0], main) * main + per_channel(lam[:, 1], shortcut) * shortcut
