"""Dynamic Coupler of IIEU-DC: fuses a residual block's main and shortcut branches.

    a        = LN_2C([GAP(main), GAP(shortcut)]) -> rows a_1, a_2 (C each)   (LN w=1, b=0)
    h_i      = W1 a_i                       (C -> C/r, no bias, shared)
    h_i'     = IIEU(h_i) at the linear site (x_pre = a_i, filter W1); term-B has one affine per row
    z        = LN_2C([W2 h_1', W2 h_2'])    (C/r -> C, no bias; LN w=0.01, b=0)
    l1, l2   = softmax over the two rows, per channel
    out      = l1 * main + l2 * shortcut
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .iieu import LinearPatches, iieu_b, inverse_filter_norms
from .layout import global_pool, per_channel


class CouplerIIEU(nn.Module):
    """IIEU over the hidden features of both rows (B, 2, C/r): shared ``eta``, per-row term-B affine."""

    def __init__(self, hidden: int, eta_init: float = 0.01, norm_init: float = 0.01, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.eta = nn.Parameter(torch.full((hidden,), float(eta_init)))
        self.norm_weight = nn.Parameter(torch.full((2, hidden), float(norm_init)))
        self.norm_bias = nn.Parameter(torch.zeros(2, hidden))

    def forward(self, h: torch.Tensor, a: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
        """h (B, 2, hidden) = fc(a), a (B, 2, C)."""
        nu = torch.sigmoid(F.layer_norm(h, (h.shape[-1],), eps=1e-6) * self.norm_weight + self.norm_bias)
        inv_w = inverse_filter_norms(fc.weight, self.eps)
        return iieu_b(h, a, inv_w, nu, self.eta, LinearPatches.from_linear(fc), self.eps, True)


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``t`` over the dims where ``shape`` (same rank) has size 1."""
    dims = tuple(i for i, (n, m) in enumerate(zip(t.shape, shape)) if m == 1 and n != 1)
    return t.sum(dims, keepdim=True) if dims else t


class _WeightedSum(torch.autograd.Function):
    """out = w1 * main + w2 * shortcut (w1, w2 broadcast per sample and channel; w1 > 0).

    Saves ``out`` and ``shortcut`` instead of ``main`` and ``shortcut``: in a residual network ``out`` is
    the next block's input, which its first convolution keeps anyway, and an identity ``shortcut`` is
    this block's input, which its own first convolution keeps. ``main`` is recovered where its gradient
    sum needs it, as ``main - shortcut = (out - w2 * shortcut) / w1 - shortcut``, per (sample, channel)."""

    @staticmethod
    def forward(ctx, main, shortcut, w1, w2):
        out = w1 * main + w2 * shortcut
        ctx.save_for_backward(out, shortcut, w1, w2)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, shortcut, w1, w2 = ctx.saved_tensors
        grad_shortcut_weight = _sum_to(grad * shortcut, w2.shape)
        # sum of grad * main = sum of grad * (out - w2 * shortcut) / w1
        grad_main_weight = (_sum_to(grad * out, w1.shape) - w2 * grad_shortcut_weight) / w1
        return grad * w1, grad * w2, grad_main_weight, grad_shortcut_weight


class DynamicCoupler(nn.Module):
    """Replace ``main + shortcut`` by ``l1 * main + l2 * shortcut`` with per-sample channel weights.

    Args:
        channels: C of both branches.
        reduction: r; the hidden width is max(C // r, 1).
    Shapes: main, shortcut (B, C, H, W), or tokens (B, N, C), or (B, C) -> same shape as ``main``.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.channels = channels
        self.in_norm = nn.LayerNorm(2 * channels, eps=1e-6)
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.act = CouplerIIEU(hidden)
        self.fc2 = nn.Linear(hidden, channels, bias=False)
        self.out_norm = nn.LayerNorm(2 * channels, eps=1e-6)
        nn.init.kaiming_normal_(self.fc1.weight, mode="fan_out")
        nn.init.kaiming_normal_(self.fc2.weight, mode="fan_out")
        nn.init.constant_(self.out_norm.weight, 0.01)
        nn.init.zeros_(self.out_norm.bias)

    def weights(self, main: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        """Fusion weights (B, 2, C), in float32 (float64 for float64 inputs); rows sum to 1."""
        if main.shape != shortcut.shape:
            raise ValueError(f"DynamicCoupler: main {tuple(main.shape)} and shortcut {tuple(shortcut.shape)} differ")
        with torch.autocast(main.device.type, enabled=False):
            dtype = torch.float64 if main.dtype == torch.float64 else torch.float32
            pooled = torch.cat([global_pool(main, dtype), global_pool(shortcut, dtype)], 1)
            if pooled.shape[1] != 2 * self.channels:
                raise ValueError(f"DynamicCoupler: expected {self.channels} channels, got {pooled.shape[1] // 2}")
            a = self.in_norm(pooled).view(-1, 2, self.channels)
            h = self.act(self.fc1(a), a, self.fc1)
            z = self.out_norm(self.fc2(h).flatten(1)).view(-1, 2, self.channels)
            return z.softmax(dim=1)

    def forward(self, main: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        lam = self.weights(main, shortcut).to(main.dtype)
        w1, w2 = per_channel(lam[:, 0], main), per_channel(lam[:, 1], shortcut)
        if torch.is_grad_enabled() and not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
            return _WeightedSum.apply(main, shortcut, w1, w2)
        return w1 * main + w2 * shortcut
