"""Independent references, written from the definitions in docs/methods.md and the activations' papers,
not from actlab's code.

Each reference takes the actlab module (only to read its parameters), the activation input ``x_t`` and,
for IIEU-B, the producer and its input ``x_pre``. They use plain autograd, so gradients come for free.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def channel_view(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(C,) or (B, C) -> broadcastable against x with channels at dim 1 (2-D/4-D) or last (3-D)."""
    if x.dim() == 3:
        return p if p.dim() == 1 else p[:, None, :]
    if x.dim() == 4:
        return p.view(1, -1, 1, 1) if p.dim() == 1 else p[:, :, None, None]
    return p


def positions_mean(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4:
        return x.mean((2, 3))
    if x.dim() == 3:
        return x.mean(1)
    return x


# ---------------------------------------------------------------- IIEU-B

def patch_norms(x_pre: torch.Tensor, producer: nn.Module) -> tuple[torch.Tensor, int]:
    """||patch|| for every output location and channel, via explicit unfolding; and the patch size n."""
    if isinstance(producer, nn.Linear):
        return x_pre.norm(dim=-1, keepdim=True), producer.in_features
    kh, kw = producer.kernel_size
    dh, dw = producer.dilation
    if producer.padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    elif producer.padding == "valid":
        pads = (0, 0, 0, 0)
    else:
        ph, pw = producer.padding
        pads = (pw, pw, ph, ph)
    xp = F.pad(x_pre, pads)
    cols = F.unfold(xp, (kh, kw), dilation=(dh, dw), stride=producer.stride)  # (B, Cin*kh*kw, L)
    b = x_pre.shape[0]
    g = producer.groups
    per_group = cols.view(b, g, -1, cols.shape[-1]).norm(dim=2)  # (B, G, L)
    out_h = (xp.shape[2] - dh * (kh - 1) - 1) // producer.stride[0] + 1
    out_w = (xp.shape[3] - dw * (kw - 1) - 1) // producer.stride[1] + 1
    per_channel = per_group.repeat_interleave(producer.out_channels // g, dim=1)  # channel c sees group c // (C/G)
    return per_channel.view(b, producer.out_channels, out_h, out_w), producer.in_channels // g * kh * kw


def ii_score(unit, x_t: torch.Tensor, x_pre: torch.Tensor, producer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """rho = S + nu and eta, both broadcastable to x_t."""
    eps = unit.eps
    pn, n = patch_norms(x_pre, producer)
    # the published code: 1 / (sqrt(mean over the k x k window of the squared channel norms) + eps) / k,
    # with that mean's square root ||patch|| / k
    k = producer.kernel_size[0] if isinstance(producer, nn.Conv2d) and unit.zero_patch == "published" else 1
    inv_x = 1.0 / (pn / k + eps) / k
    if unit.zero_patch == "silence":
        inv_x = torch.where(pn < 1e-6 * math.sqrt(n), torch.zeros_like(inv_x), inv_x)
    inv_w = 1.0 / (producer.weight.flatten(1).norm(dim=1) + eps)
    if isinstance(producer, nn.Linear):
        term_s = x_t * inv_w * inv_x
        gap = x_t if x_t.dim() == 2 else x_t.mean(tuple(range(1, x_t.dim() - 1)))
    else:
        term_s = x_t * inv_w.view(1, -1, 1, 1) * inv_x
        gap = x_t.mean((2, 3))
    ln = F.layer_norm(gap, (gap.shape[-1],), unit.norm.weight, unit.norm.bias, 1e-6)
    nu = torch.sigmoid(ln)
    if isinstance(producer, nn.Linear):
        nu = nu.view(nu.shape[0], *([1] * (x_t.dim() - 2)), -1)
        eta = unit.eta
    else:
        nu = nu[:, :, None, None]
        eta = unit.eta.view(1, -1, 1, 1)
    return term_s + nu, eta


def iieu_b(unit, x_t: torch.Tensor, x_pre: torch.Tensor, producer: nn.Module) -> torch.Tensor:
    rho, eta = ii_score(unit, x_t, x_pre, producer)
    # the exponential branch only applies below eta; clamping keeps where()'s unused branch finite
    s = torch.where(rho >= eta, rho, eta * torch.exp(torch.clamp(rho - eta, max=0.0)))
    return s * x_t


# ---------------------------------------------------------------- baselines

SELU_SCALE = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717


def gdn(m, x):
    beta = m.beta.clamp_min(m.beta_min)
    gamma = m.gamma.clamp_min(0.0)
    if x.dim() == 4:
        denom = beta.view(1, -1, 1, 1) + torch.einsum("cj,bjhw->bchw", gamma, x * x)
    else:
        denom = beta + torch.einsum("cj,...j->...c", gamma, x * x)
    return x / torch.sqrt(denom)


def acon(x, p1, p2, beta):
    d = channel_view(p1, x) - channel_view(p2, x)
    return d * x * torch.sigmoid(channel_view(beta, x) * d * x) + channel_view(p2, x) * x


def meta_acon(m, x):
    pooled = positions_mean(x)
    hidden = pooled @ m.fc1.weight.T + m.fc1.bias
    beta = torch.sigmoid(hidden @ m.fc2.weight.T + m.fc2.bias)
    return acon(x, m.p1, m.p2, beta)


def smu(m, x):
    a = m.alpha
    return ((1 + a) * x + (1 - a) * x * torch.erf(m.mu * (1 - a) * x)) / 2


def frelu(m, x):
    funnel = F.conv2d(x, m.conv.weight, padding=m.conv.padding, groups=x.shape[1])
    bn = m.bn  # eval mode: running statistics
    funnel = (funnel - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
    funnel = funnel * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    return torch.where(x > funnel, x, funnel)


def dyrelu(m, x):
    pooled = positions_mean(x)
    hidden = torch.clamp_min(pooled @ m.fc1.weight.T + m.fc1.bias, 0)
    theta = 2 * torch.sigmoid(hidden @ m.fc2.weight.T + m.fc2.bias) - 1
    theta = theta.view(x.shape[0], m.channels, 4)
    a1 = 1.0 + 1.0 * theta[..., 0]
    a2 = 0.0 + 1.0 * theta[..., 1]
    b1 = 0.0 + 0.5 * theta[..., 2]
    b2 = 0.0 + 0.5 * theta[..., 3]
    piece1 = channel_view(a1, x) * x + channel_view(b1, x)
    piece2 = channel_view(a2, x) * x + channel_view(b2, x)
    return torch.where(piece1 >= piece2, piece1, piece2)


def tau(m, x):
    return torch.where(x >= m.tau, x, torch.zeros_like(x))


REFERENCES = {
    "relu": lambda m, x: torch.where(x > 0, x, torch.zeros_like(x)),
    "leaky_relu": lambda m, x: torch.where(x >= 0, x, 0.01 * x),
    "prelu": lambda m, x: torch.where(x >= 0, x, channel_view(m.weight, x) * x),
    "elu": lambda m, x: torch.where(x > 0, x, torch.exp(x) - 1),
    "selu": lambda m, x: SELU_SCALE * torch.where(x > 0, x, SELU_ALPHA * (torch.exp(x) - 1)),
    "softplus": lambda m, x: torch.log1p(torch.exp(x)),
    "gelu": lambda m, x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "silu": lambda m, x: x / (1 + torch.exp(-x)),
    "mish": lambda m, x: x * torch.tanh(torch.log1p(torch.exp(x))),
    "gdn": gdn,
    "acon_c": lambda m, x: acon(x, m.p1, m.p2, m.beta),
    "meta_acon": meta_acon,
    "smu": smu,
    "frelu": frelu,
    "dyrelu": dyrelu,
    "dpa": tau,  # eval-mode forward; the memories have their own sequential reference in test_dpa.py
    "iieu_b": None,  # needs the producer: see iieu_b() above
}


# ---------------------------------------------------------------- DPA, one sample at a time

class SequentialDPA:
    """The DPA rule exactly as docs/methods.md states it, with Python loops over samples."""

    def __init__(self, num_classes: int, channels: int, tau: float = 0.0, interval: int = 5, alpha: float = 0.9):
        self.value = torch.zeros(num_classes, channels)
        self.grad = torch.zeros(num_classes, channels)
        self.count, self.tau, self.interval, self.alpha = 0, tau, interval, alpha

    @staticmethod
    def pool(x: torch.Tensor, batch: int, cls_token: bool = False) -> torch.Tensor:
        if x.dim() == 4:
            v = x.mean((2, 3), dtype=torch.float32)
        elif x.dim() == 3:
            v = x[:, 0].float() if cls_token else x.mean(1, dtype=torch.float32)
        else:
            v = x.float()
        if v.shape[0] != batch:
            k = v.shape[0] // batch
            v = torch.stack([v[i * k:(i + 1) * k].mean(0) for i in range(batch)])
        return v

    def forward(self, v: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """v (B, C) pooled pre-activation (with grad). Returns (mask, is_update_step)."""
        self.count = (self.count + 1) % self.interval
        update = self.count == 0
        rows = []
        for i in range(len(y)):
            c = int(y[i])
            if update:
                self.value[c] = self.value[c] + self.alpha * (v[i].detach() - self.value[c])
            rows.append(self.value[c].clone())
        mem = torch.stack(rows)
        mask = (mem < self.tau) & (v.detach() > self.tau) & (self.grad[y] < 0)
        return mask, update

    def backward(self, g: torch.Tensor, y: torch.Tensor) -> None:
        for i in range(len(y)):
            c = int(y[i])
            sign = torch.where(g[i] > 0, 1.0, -1.0)
            self.grad[c] = self.grad[c] + self.alpha * (sign - self.grad[c])
