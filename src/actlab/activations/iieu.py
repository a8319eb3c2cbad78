"""IIEU-B: Instantaneous Importance Estimation Unit, basic form (SPEC section 1).

At a site ``x_pre -> P (Conv2d | Linear) -> [norm] -> x_t -> IIEU``::

    S    = x_t / ((||w_c|| + eps) * (||patch|| + eps))   # term-S, norm-decoupled similarity
    nu   = sigmoid(LN_C(GAP(x_t)))                      # term-B, per (sample, channel)
    rho  = S + nu
    out  = s(rho) * x_t,   s(r) = r if r >= eta_c else eta_c * exp(r - eta_c)

``patch`` is the receptive field of the output location in ``x_pre`` over the channels of the filter's
group (zero padding counted as zeros). A patch whose RMS is below 1e-6 has no direction: its term-S is
set to 0 (``zero_patch="silence"``, the default); ``zero_patch="published"`` keeps the papers'
``1 / (||x|| + 1e-8)``, which multiplies such patches by about 1e8.

Unlike the published code, grouped and depthwise convolutions take the patch norm over the group's own
channels only (the published code normed over all input channels there).

Memory: the autograd function keeps ``x_pre`` (which the producer keeps for its own backward anyway),
per-channel / per-location values and ``x_t``, unless ``x_t`` is the untouched output of a plain
BatchNorm, or of a Linear producer without a norm: then it keeps what that module keeps anyway and
replays it in backward. Everything else is recomputed in backward. Norms, term-B and the adjuster run in float32
(float64 for float64 inputs), also under autocast. The elementwise math runs as torch.compile'd kernels
(see ``set_kernels``).
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.nn.modules.batchnorm import _BatchNorm

from . import kernels
from .base import ActivationModule
from .registry import ActivationSpec, register

SILENT_RMS = 1e-6


def _autocast_off(device_type: str):
    """Autocast disabled for the block; no context switch at all when it is not on (the usual case)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _autocast_as(device_type: str, enabled: bool, dtype: torch.dtype):
    """Autocast as it was for a recorded call (``enabled``, ``dtype``), switching only when needed."""
    if enabled:
        return torch.autocast(device_type, dtype=dtype)
    return _autocast_off(device_type)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _same_pads(kernel: int, dilation: int) -> tuple[int, int]:
    total = dilation * (kernel - 1)
    return total // 2, total - total // 2


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
        """(B, Cin, H, W) -> squared patch norms (B, G, H', W')."""
        sq = self._grouped_square_sum(x_pre)
        if any(self.pads):
            sq = F.pad(sq, self.pads)
        return F.conv2d(sq, self._ones(sq), stride=self.stride, dilation=self.dilation, groups=self.groups)

    def sumsq_backward(self, x_pre: torch.Tensor, grad_sumsq: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x_pre.shape
        l, r, t, bt = self.pads
        padded = (b, self.groups, h + t + bt, w + l + r)
        g = torch.nn.grad.conv2d_input(padded, self._ones(grad_sumsq), grad_sumsq, stride=self.stride,
                                       dilation=self.dilation, groups=self.groups)
        g = g[:, :, t:t + h, l:l + w]
        grad = x_pre.view(b, self.groups, c // self.groups, h, w) * (2 * g).unsqueeze(2)
        return grad.view(b, c, h, w)

    # channel views: x (B, C, H, W) <-> (B, G, C/G, H, W)
    def view_x(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.reshape(b, self.groups, c // self.groups, h, w)

    def reduction_dims(self, ndim: int, nu_full: bool) -> tuple[tuple[int, ...], ...]:
        """Dims summed for the gradients of invX, of per-channel values and of nu, in the 5-D view."""
        return (2,), (0, 3, 4), (3, 4)

    def unview_x(self, x: torch.Tensor) -> torch.Tensor:
        b, g, cg, h, w = x.shape
        return x.reshape(b, g * cg, h, w)

    def view_inv(self, inv: torch.Tensor) -> torch.Tensor:
        return inv.unsqueeze(2)

    def view_channel(self, p: torch.Tensor) -> torch.Tensor:  # (C,)
        return p.view(1, self.groups, -1, 1, 1)

    def view_nu(self, nu: torch.Tensor, x_dim: int) -> torch.Tensor:  # (B, C)
        return nu.view(nu.shape[0], self.groups, -1, 1, 1)

    def gap(self, x_t: torch.Tensor) -> torch.Tensor:
        return x_t.mean((2, 3), dtype=_compute_dtype(x_t))


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

    def sumsq_backward(self, x_pre: torch.Tensor, grad_sumsq: torch.Tensor) -> torch.Tensor:
        return 2 * x_pre * grad_sumsq

    def view_x(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def reduction_dims(self, ndim: int, nu_full: bool) -> tuple[tuple[int, ...], ...]:
        return (ndim - 1,), tuple(range(ndim - 1)), (() if nu_full else tuple(range(1, ndim - 1)))

    def unview_x(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def view_inv(self, inv: torch.Tensor) -> torch.Tensor:
        return inv

    def view_channel(self, p: torch.Tensor) -> torch.Tensor:
        return p

    def view_nu(self, nu: torch.Tensor, x_dim: int) -> torch.Tensor:
        # (B, C) per sample, broadcast over tokens; or already the full (B, *, C) shape
        if nu.dim() == x_dim:
            return nu
        return nu.view(nu.shape[0], *([1] * (x_dim - 2)), nu.shape[-1])

    def gap(self, x_t: torch.Tensor) -> torch.Tensor:
        dt = _compute_dtype(x_t)
        if x_t.dim() == 2:
            return x_t.to(dt)
        return x_t.mean(tuple(range(1, x_t.dim() - 1)), dtype=dt)


Patches = ConvPatches | LinearPatches


def inverse_patch_norm(sumsq: torch.Tensor, patch_numel: int, eps: float, silence: bool) -> torch.Tensor:
    """invX = 1 / (||patch|| + eps); patches with RMS < 1e-6 get 0 when ``silence``."""
    norm = sumsq.sqrt()
    inv = 1.0 / (norm + eps)
    if silence:
        inv = torch.where(norm < _silent_norm(patch_numel), torch.zeros_like(inv), inv)
    return inv


def _silent_norm(patch_numel: int) -> float:
    """Patches with a norm below this have an RMS below SILENT_RMS."""
    return SILENT_RMS * math.sqrt(patch_numel)


def _native_rows_ops(patches, x_pre: torch.Tensor, ct: torch.dtype):
    """The C++ ops for a Linear site's patch norms (one pass over x_pre each way), or None."""
    if not isinstance(patches, LinearPatches) or ct != torch.float32:
        return None
    return _native_ops(x_pre)


def _patch_inverse(patches, x_pre, eps, silence, ct):
    """invX and the squared patch norms it came from, both shaped like ``patches.sumsq(x_pre)``."""
    ops = _native_rows_ops(patches, x_pre, ct)
    if ops is None:
        sumsq = patches.sumsq(x_pre.to(ct))
        return inverse_patch_norm(sumsq, patches.patch_numel, eps, silence), sumsq
    shape = (*x_pre.shape[:-1], 1)
    silent = _silent_norm(patches.patch_numel) if silence else -1.0
    inv, sumsq = ops.rows_inv_norm(x_pre.contiguous().view(-1, x_pre.shape[-1]), eps, silent)
    return inv.view(shape), sumsq.view(shape)


def _patch_inverse_backward(patches, x_pre, sumsq, grad_inv, eps, silence, ct):
    """dL/d x_pre (x_pre's dtype) from dL/d invX."""
    ops = _native_rows_ops(patches, x_pre, ct)
    if ops is None:
        grad_sumsq = _inverse_patch_norm_grad(sumsq, patches.patch_numel, eps, silence, grad_inv)
        return patches.sumsq_backward(x_pre.to(ct), grad_sumsq).to(x_pre.dtype)
    silent = _silent_norm(patches.patch_numel) if silence else -1.0
    rows = x_pre.contiguous().view(-1, x_pre.shape[-1])
    grad = ops.rows_inv_norm_backward(rows, sumsq.contiguous().view(-1), grad_inv.contiguous().view(-1).float(),
                                      eps, silent)
    return grad.view(x_pre.shape)


def _inverse_patch_norm_grad(sumsq: torch.Tensor, patch_numel: int, eps: float, silence: bool,
                             grad_inv: torch.Tensor) -> torch.Tensor:
    norm = sumsq.sqrt()
    inv = 1.0 / (norm + eps)
    live = norm > 0
    if silence:
        live = live & (norm >= _silent_norm(patch_numel))
    # d inv / d sumsq = -inv^2 / (2 norm); subgradient 0 at norm = 0, as torch.linalg.norm does
    safe = torch.where(live, norm, torch.ones_like(norm))
    return torch.where(live, -grad_inv * inv.square() / (2 * safe), torch.zeros_like(norm))


def _views(patches, x_t, inv_x, inv_w, nu, eta):
    xv = patches.view_x(x_t)
    iv = patches.view_inv(inv_x)
    wv = patches.view_channel(inv_w)
    nv = patches.view_nu(nu, x_t.dim())
    ev = patches.view_channel(eta)
    return xv, iv, wv, nv, ev


def _forward_kernel(x, iv, wv, nv, ev):
    """out = s(x * wv * iv + nv) * x, computed in float32 (float64 for float64 x), returned in x's dtype."""
    ct = _compute_dtype(x)
    xc = x.to(ct)
    rho = xc * (wv * iv) + nv
    scale = torch.where(rho >= ev, rho, ev * torch.exp(torch.clamp(rho - ev, max=0.0)))
    return (scale * xc).to(x.dtype)


def _backward_kernel(go, x, iv, wv, nv, ev, extra, inv_dims: tuple[int, ...], channel_dims: tuple[int, ...],
                     nu_dims: tuple[int, ...]):
    """Gradients of ``_forward_kernel``; the per-channel ones are returned as sums still to be reshaped.
    ``extra`` (broadcast like nv) is added to grad_x: term-B's gradient through the mean over positions.

    d out/d x = s + x * s'(rho) * wv * iv;  s' = 1 above eta, eta * exp(rho - eta) below;
    d s/d eta = (1 - eta) * exp(rho - eta) below eta, 0 above.
    """
    ct = _compute_dtype(x)
    xc, gc = x.to(ct), go.to(ct)
    a = wv * iv
    rho = xc * a + nv
    below = rho < ev
    expo = torch.exp(torch.clamp(rho - ev, max=0.0))
    s_low = expo * ev
    scale = torch.where(below, s_low, rho)
    g_scale = gc * xc
    g_rho = torch.where(below, g_scale * s_low, g_scale)
    grad_x = (gc * scale + g_rho * a + extra).to(x.dtype)
    g_rx = g_rho * xc
    grad_iv = (g_rx * wv).sum(inv_dims, keepdim=True)
    grad_wv = (g_rx * iv).sum(channel_dims)
    grad_nv = g_rho.sum(nu_dims, keepdim=True) if nu_dims else g_rho
    grad_ev = torch.where(below, g_scale * expo, torch.zeros_like(expo)).sum(channel_dims)
    return grad_x, grad_iv, grad_wv, grad_nv, grad_ev


# Inductor fuses each backward output best as a kernel of its own (measured on a 2-core CPU: 10 ms
# against 35 ms for one five-output kernel on a ViT MLP site); distinct functions keep their caches apart.
def _grad_x_kernel(*args):
    return _backward_kernel(*args)[0]


def _grad_iv_kernel(*args):
    return _backward_kernel(*args)[1]


def _grad_wv_kernel(*args):
    return _backward_kernel(*args)[2]


def _grad_nv_kernel(*args):
    return _backward_kernel(*args)[3]


def _grad_ev_kernel(*args):
    return _backward_kernel(*args)[4]


_BACKWARD_PARTS = (_grad_x_kernel, _grad_iv_kernel, _grad_wv_kernel, _grad_nv_kernel, _grad_ev_kernel)
_KERNEL_MODES = ("auto", "native", "compiled", "eager")
_kernel_mode = os.environ.get("ACTLAB_IIEU_KERNELS", "auto")
_compiled: dict[object, object] = {}


def set_kernels(mode: str) -> None:
    """Choose how IIEU-B's elementwise forward/backward run outside torch.compile.

    ``"native"``: actlab's C++ CPU kernels (one vectorised, multi-threaded pass each way) for float32 CPU
    tensors, built once per machine on first use (about 30 s, needs a C++ compiler); other inputs take the
    compiled kernels. ``"compiled"``: fused by torch.compile (Inductor: C++ on CPU, Triton on GPU); the
    first call per input shape compiles for a few seconds. ``"eager"``: plain PyTorch ops, no compilation.
    ``"auto"`` (default, also set by the environment variable ACTLAB_IIEU_KERNELS): native where it
    applies, else compiled, each falling back to the next with a warning when it cannot be built here.
    """
    global _kernel_mode
    if mode not in _KERNEL_MODES:
        raise ValueError(f"IIEU kernels must be one of {_KERNEL_MODES}, got {mode!r}")
    _kernel_mode = mode


def _check_mode() -> str:
    if _kernel_mode not in _KERNEL_MODES:
        raise ValueError(f"ACTLAB_IIEU_KERNELS must be one of {_KERNEL_MODES}, got {_kernel_mode!r}")
    return _kernel_mode


def _use_compiled() -> bool:
    return _check_mode() in ("compiled", "native") or (_kernel_mode == "auto" and not _compiled.get("broken"))


def _compiled_fn(fn):
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)  # one kernel for every site shape
    return _compiled[fn]


def _run_compiled(eager_fn, compiled_call, args):
    try:
        return compiled_call()
    except Exception as exc:  # noqa: BLE001 - only in "auto": no C++ compiler, unsupported platform, ...
        if _kernel_mode != "auto":
            raise
        warnings.warn(f"IIEU-B: compiled kernels unavailable ({type(exc).__name__}: {exc}); using eager "
                      "kernels. Choose explicitly with actlab.activations.iieu.set_kernels().", RuntimeWarning)
        _compiled["broken"] = True
        return eager_fn(*args)


def _native_ops(x: torch.Tensor):
    """actlab's C++ kernels when the mode allows them and ``x`` is a float32 CPU tensor, else None."""
    if _check_mode() not in ("auto", "native") or x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    return kernels.ops_or_fallback(kernels.iieu_cpu(), _kernel_mode == "native", "IIEU-B", "the compiled kernels")


def _native_layout(patches, x_t, inv_x, nu):
    """Flat contiguous views for the C++ kernels: planes (B, C, P) / (B, G, P), or rows (R, C) / (R,)."""
    if isinstance(patches, ConvPatches):
        b, c = x_t.shape[:2]
        return "planes", x_t.contiguous().view(b, c, -1), inv_x.contiguous().view(b, patches.groups, -1), nu.contiguous()
    c = x_t.shape[-1]
    rows_nu = nu.reshape(-1, c) if nu.dim() == x_t.dim() else nu  # per-row term-B (coupler) or per sample
    return "rows", x_t.contiguous().view(-1, c), inv_x.contiguous().view(-1), rows_nu.contiguous()


def _forward(patches, x_t, inv_x, inv_w, nu, eta):
    """IIEU-B's elementwise forward, out = s(x_t * inv_w * inv_x + nu) * x_t, by the chosen kernels."""
    ops = _native_ops(x_t)
    if ops is not None:
        layout, x, inv, nu_flat = _native_layout(patches, x_t, inv_x, nu)
        op = ops.planes_forward if layout == "planes" else ops.rows_forward
        return op(x, inv, inv_w.contiguous(), nu_flat, eta.contiguous()).view(x_t.shape)
    args = _views(patches, x_t, inv_x, inv_w, nu, eta)
    if not _use_compiled():
        return patches.unview_x(_forward_kernel(*args))
    return patches.unview_x(_run_compiled(_forward_kernel, lambda: _compiled_fn(_forward_kernel)(*args), args))


def _backward_part(index: int, *args):
    """Output ``index`` of ``_backward_kernel`` (compiled as a kernel of its own)."""
    part = _BACKWARD_PARTS[index]
    return _run_compiled(part, lambda: _compiled_fn(part)(*args), args)


@dataclass(frozen=True)
class TermB:
    """What term-B's forward, nu = sigmoid(LayerNorm(gap) * weight + bias), leaves for the gradient
    through gap: the input and the LayerNorm's statistics (B, 1) and weight."""

    gap: torch.Tensor
    mean: torch.Tensor
    rstd: torch.Tensor
    weight: torch.Tensor

    def tensors(self) -> tuple:
        return self.gap, self.mean, self.rstd, self.weight

    @staticmethod
    def input_grad(grad_nu, nu, gap, mean, rstd, weight):
        """dL/d gap (B, C) from dL/d nu: sigmoid's and LayerNorm's own backward kernels."""
        grad_z = torch.ops.aten.sigmoid_backward(grad_nu, nu)
        return torch.ops.aten.native_layer_norm_backward(grad_z, gap, gap.shape[-1:], mean, rstd, weight, None,
                                                         [True, False, False])[0]


def iieu_b_plain(x_t, x_pre, inv_w, nu, eta, patches, eps=1e-8, silence=True):
    """IIEU-B with plain tensor ops (no custom backward): for inference, torch.compile and export.

    Shapes: x_t (B, C, H', W') or (B, *, C); x_pre the producer's input; inv_w (C,); nu (B, C); eta (C,).
    """
    ct = _compute_dtype(x_t)
    inv_x = inverse_patch_norm(patches.sumsq(x_pre.to(ct)), patches.patch_numel, eps, silence)
    args = (patches, x_t, inv_x, inv_w.to(ct), nu.to(ct), eta.to(ct))
    if _tracing():  # traced graphs must see plain ops, which the compiler or exporter fuses itself
        return patches.unview_x(_forward_kernel(*_views(*args)))
    return _forward(*args)


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


@dataclass(frozen=True)
class BatchNormReplay:
    """How to recompute ``x_t = BatchNorm(c)`` in backward from the BN input ``c`` (which BatchNorm keeps
    for its own backward anyway) instead of keeping ``x_t``: same kernel, same inputs, same values."""

    batch_stats: bool
    eps: float
    autocast: bool
    autocast_dtype: torch.dtype

    @classmethod
    def of_call(cls, norm: nn.Module, output: torch.Tensor) -> "BatchNormReplay":
        device = output.device.type
        batch_stats = norm.training or (norm.running_mean is None and norm.running_var is None)
        return cls(batch_stats, norm.eps, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

    def tensors(self, norm: nn.Module, c: torch.Tensor) -> tuple:
        stats = (None, None) if self.batch_stats else (norm.running_mean, norm.running_var)
        return (c, norm.weight, norm.bias, *stats)

    def replay(self, c, weight, bias, running_mean, running_var) -> torch.Tensor:
        with _autocast_as(c.device.type, self.autocast, self.autocast_dtype):
            return F.batch_norm(c, running_mean, running_var, weight, bias, self.batch_stats, 0.0, self.eps)


@dataclass(frozen=True)
class LinearReplay:
    """How to recompute ``x_t = Linear(x_pre)`` at a site without a norm, from ``x_pre`` and the weights
    (which the Linear keeps for its own backward anyway): one matmul in backward instead of a kept map."""

    autocast: bool
    autocast_dtype: torch.dtype

    @classmethod
    def of_call(cls, linear: nn.Module, output: torch.Tensor) -> "LinearReplay":
        device = output.device.type
        return cls(torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

    def tensors(self, linear: nn.Module, x: torch.Tensor) -> tuple:
        return (x, linear.weight, linear.bias)

    def replay(self, x, weight, bias) -> torch.Tensor:
        with _autocast_as(x.device.type, self.autocast, self.autocast_dtype):
            return F.linear(x, weight, bias)


def _backward_views(patches, grad_out, x_t, inv_x, inv_w, nu, eta, term_b_grad):
    """Backward by the compiled or eager kernels on the (B, G, C/G, H, W) / (B, *, C) views."""
    xv, iv, wv, nv, ev = _views(patches, x_t, inv_x, inv_w, nu, eta)
    args = (patches.view_x(grad_out.contiguous()), xv, iv, wv, nv, ev)
    dims = patches.reduction_dims(xv.dim(), nv.shape == xv.shape)
    zero = xv.new_zeros((), dtype=_compute_dtype(x_t))
    if _use_compiled():
        grad_nv = _backward_part(3, *args, zero, *dims)
        grad_gap = term_b_grad(grad_nv)
        extra = zero if grad_gap is None else patches.view_nu(grad_gap, x_t.dim())
        grad_x, grad_iv, grad_wv, grad_ev = (_backward_part(i, *args, extra if i == 0 else zero, *dims)
                                              for i in (0, 1, 2, 4))
    else:
        grad_x, grad_iv, grad_wv, grad_nv, grad_ev = _backward_kernel(*args, zero, *dims)
        grad_gap = term_b_grad(grad_nv)
        if grad_gap is not None:
            grad_x = grad_x + patches.view_nu(grad_gap, x_t.dim()).to(grad_x.dtype)
    return patches.unview_x(grad_x), grad_iv, grad_wv, grad_nv, grad_ev


def _native_backward(ops, patches, grad_out, x_t, inv_x, inv_w, nu, eta, term_b_grad, grad_into_x=False):
    """Backward by actlab's C++ kernels: one pass, then term-B's gradient added in place.
    ``grad_into_x``: x_t is a temporary of the caller's, overwritten by grad_x (one allocation less)."""
    layout, x, inv, nu_flat = _native_layout(patches, x_t, inv_x, nu)
    op = ops.planes_backward if layout == "planes" else ops.rows_backward
    grad_into_x = grad_into_x or x.data_ptr() != x_t.data_ptr()  # a copy made for the layout is ours too
    grad_x, grad_iv, grad_wv, grad_nv, grad_ev = op(grad_out.contiguous().view(x.shape), x, inv,
                                                    inv_w.contiguous(), nu_flat, eta.contiguous(), grad_into_x)
    grad_gap = term_b_grad(grad_nv)
    if grad_gap is not None:  # (B, C), the same for every position of a sample
        if layout == "planes":
            grad_x.view(grad_x.shape[0], grad_x.shape[1], -1).add_(grad_gap.unsqueeze(-1))
        else:
            grad_x.view(grad_gap.shape[0], -1, grad_gap.shape[1]).add_(grad_gap.unsqueeze(1))
    return grad_x.view(grad_out.shape), grad_iv, grad_wv, grad_nv, grad_ev


class IIEUFunction(torch.autograd.Function):
    """out = s(x_t * inv_w * invX(x_pre) + nu) * x_t with a recomputing backward.

    Saves x_pre, inv_w, nu, eta (and the squared patch norms when they are small) and x_t, or instead of
    x_t the BatchNorm input and parameters that ``replay`` recomputes it from. x_pre is kept by the
    producer for its own backward anyway.
    """

    @staticmethod
    def forward(ctx, x_t, x_pre, inv_w, nu, eta, patches, eps, silence, replay=None, replay_tensors=(),
                term_b=None):
        with _autocast_off(x_t.device.type):
            ct = _compute_dtype(x_t)
            inv_x, sumsq = _patch_inverse(patches, x_pre, eps, silence, ct)
            out = _forward(patches, x_t, inv_x, inv_w.to(ct), nu.to(ct), eta.to(ct))
        keep_norms = sumsq.numel() * 16 <= x_t.numel()  # else recomputed in backward (depthwise convs)
        kept_x_t = None if replay is not None else x_t
        # term_b (a TermB): nu was computed from a detached GAP(x_t); backward adds that path's gradient
        # to grad x_t itself, after the kernel (saves a full-size autograd add)
        term_b_tensors = term_b.tensors() if term_b is not None else (None,) * 4
        norms = (inv_x, sumsq) if keep_norms else (None, None)
        ctx.save_for_backward(kept_x_t, x_pre, inv_w, nu, eta, *norms, *term_b_tensors, *replay_tensors)
        ctx.patches, ctx.eps, ctx.silence, ctx.replay = patches, eps, silence, replay
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_t, x_pre, inv_w, nu, eta, inv_x, sumsq, gap, mean, rstd, ln_weight, *replay_tensors = ctx.saved_tensors
        patches, eps, silence, replay = ctx.patches, ctx.eps, ctx.silence, ctx.replay
        if x_t is None:
            with torch.no_grad():
                x_t = replay.replay(*replay_tensors)
        with _autocast_off(grad_out.device.type):
            ct = _compute_dtype(x_t)
            if sumsq is None:
                inv_x, sumsq = _patch_inverse(patches, x_pre, eps, silence, ct)

            def term_b_grad(grad_nv):  # dL/d GAP(x_t) spread over the positions, (B, C)
                if gap is None:
                    return None
                positions = grad_out.numel() // nu.numel()
                grad_gap = TermB.input_grad(grad_nv.reshape(nu.shape), nu, gap, mean, rstd, ln_weight.to(gap.dtype))
                return grad_gap / positions

            args = (patches, grad_out, x_t, inv_x, inv_w.to(ct), nu.to(ct), eta.to(ct), term_b_grad)
            native = _native_ops(x_t) if grad_out.dtype == x_t.dtype else None
            if native is not None:  # a replayed x_t is ours: the kernel writes grad_x over it
                grads = _native_backward(native, *args, grad_into_x=replay is not None)
            else:
                grads = _backward_views(*args)
            grad_x, grad_iv, grad_wv, grad_nv, grad_ev = grads
            grad_x_pre = None
            if ctx.needs_input_grad[1]:
                grad_inv_x = grad_iv.reshape(inv_x.shape)
                grad_x_pre = _patch_inverse_backward(patches, x_pre, sumsq, grad_inv_x, eps, silence, ct)
            grad_eta = grad_ev.reshape(-1) * (1 - eta.to(ct))
        return (grad_x, grad_x_pre, grad_wv.reshape(inv_w.shape).to(inv_w.dtype),
                grad_nv.reshape(nu.shape).to(nu.dtype), grad_eta.to(eta.dtype), None, None, None, None, None, None)


def _custom_backward_wanted() -> bool:
    """The memory-saving autograd function serves training in eager mode; inference, torch.compile and
    export take the plain ops (which those fuse and trace themselves)."""
    return torch.is_grad_enabled() and not (torch.jit.is_tracing() or torch.compiler.is_compiling())


def iieu_b(x_t, x_pre, inv_w, nu, eta, patches, eps=1e-8, silence=True):
    """Functional IIEU-B given term-B ``nu`` and the inverse filter norms ``inv_w``."""
    if _custom_backward_wanted():
        return IIEUFunction.apply(x_t, x_pre, inv_w, nu, eta, patches, eps, silence)
    return iieu_b_plain(x_t, x_pre, inv_w, nu, eta, patches, eps, silence)


def inverse_filter_norms(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(C_out, ...) filters -> 1 / (||w_c|| + eps), (C_out,), float32 or float64."""
    return 1.0 / (weight.flatten(1).to(_compute_dtype(weight)).norm(dim=1) + eps)


class IIEUB(ActivationModule):
    """IIEU-B activation for one site.

    Args:
        channels: C, the producer's output channels.
        eta_init: initial per-channel threshold ``eta`` (shape (C,)).
        norm_init: initial weight of the term-B LayerNorm ``norm`` (bias starts at 0).
        eps: added to the filter and patch norms.
        zero_patch: ``"silence"`` (term-S = 0 for patches with RMS < 1e-6) or ``"published"``.
        producer: the Conv2d / Linear feeding this site; may also be bound later with ``bind``.
        capture: when bound, record the producer's input with a forward pre-hook so ``forward(x_t)``
            works inside an unmodified model. Without it, pass ``x_pre`` to ``forward`` yourself.
        recompute_linear: at a Linear site without a norm, recompute ``x_t`` in backward (one matmul)
            instead of keeping it for backward: one feature map less per site, for about 15-20 % more
            time of a ViT MLP block on a 2-core CPU (README, speed table). Sites after a BatchNorm always
            recompute (cheap); other sites keep ``x_t``.

    Shapes: conv site x_t (B, C, H', W'), x_pre (B, Cin, H, W); linear site x_t (B, *, C), x_pre (B, *, Cin).
    """

    def __init__(self, channels: int, eta_init: float = 0.05, norm_init: float = 0.01, eps: float = 1e-8,
                 zero_patch: str = "silence", producer: nn.Module | None = None, capture: bool = True,
                 recompute_linear: bool = True):
        super().__init__()
        if zero_patch not in ("silence", "published"):
            raise ValueError(f"zero_patch must be 'silence' or 'published', got {zero_patch!r}")
        self.channels, self.eps, self.zero_patch = channels, eps, zero_patch
        self.recompute_linear = recompute_linear
        self.eta = nn.Parameter(torch.full((channels,), float(eta_init)))
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        nn.init.constant_(self.norm.weight, norm_init)
        nn.init.zeros_(self.norm.bias)
        self.site = "<unbound>"
        object.__setattr__(self, "_producer", None)  # a reference, not a submodule: no duplicate weights
        self._patches: Patches | None = None
        self._hooks: list = []
        self._x_pre: torch.Tensor | None = None
        object.__setattr__(self, "_maker", None)  # the BatchNorm / Linear whose output x_t is replayed
        self._maker_io: tuple | None = None  # (input, output, output version, replay) of its last call
        if producer is not None:
            self.bind(producer, capture=capture)

    @property
    def producer(self) -> nn.Module | None:
        return self._producer

    def bind(self, producer: nn.Module, capture: bool = True, norm: nn.Module | None = None) -> "IIEUB":
        """Attach to the Conv2d / Linear whose output (after an optional norm) this unit activates.

        Args:
            producer: the nn.Conv2d or nn.Linear of the site.
            capture: record the producer's input with a forward pre-hook (else pass ``x_pre`` yourself).
            norm: the site's norm, if any. The unit recomputes ``x_t`` in backward instead of keeping it
                (one feature map less per site) when ``x_t`` is the output of a plain BatchNorm, or of a
                Linear producer with no norm; other sites keep it.
        """
        if isinstance(producer, nn.Conv2d):
            patches = ConvPatches.from_conv(producer)
            out = producer.out_channels
        elif isinstance(producer, nn.Linear):
            patches = LinearPatches.from_linear(producer)
            out = producer.out_features
        else:
            raise TypeError(f"IIEU-B site {self.site!r}: producer must be nn.Conv2d or nn.Linear, "
                            f"got {type(producer).__name__}")
        if out != self.channels:
            raise ValueError(f"IIEU-B site {self.site!r}: producer has {out} output channels, unit has {self.channels}")
        self.unbind()
        object.__setattr__(self, "_producer", producer)
        self._patches = patches
        if capture:
            self._hooks.append(producer.register_forward_pre_hook(self._capture))
            # x_t recomputed in backward rather than kept, from what its maker keeps anyway
            if norm is not None and type(norm).forward is _BatchNorm.forward:
                self._watch_maker(norm, BatchNormReplay)
            elif norm is None and self.recompute_linear and type(producer).forward is nn.Linear.forward:
                self._watch_maker(producer, LinearReplay)
        return self

    def unbind(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._x_pre, self._patches, self._maker_io = [], None, None, None
        object.__setattr__(self, "_producer", None)
        object.__setattr__(self, "_maker", None)

    def _capture(self, module: nn.Module, args: tuple) -> None:
        self._x_pre = args[0]

    def _watch_maker(self, maker: nn.Module, replay_type) -> None:
        object.__setattr__(self, "_maker", maker)
        self._replay_type = replay_type
        self._hooks.append(maker.register_forward_hook(self._capture_maker))

    def _capture_maker(self, maker: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._maker_io = (args[0], output, output._version, self._replay_type.of_call(maker, output))

    def _replay_for(self, x_t: torch.Tensor):
        """How to recompute x_t in backward, when x_t is, untouched, the output of its maker's last call."""
        io, self._maker_io = self._maker_io, None
        if io is None or io[1] is not x_t or io[2] != x_t._version:
            return None, ()
        maker_input, _, _, replay = io
        return replay, replay.tensors(self._maker, maker_input)

    def term_b(self, x_t: torch.Tensor) -> torch.Tensor:
        """nu = sigmoid(LN_C(GAP(x_t))), (B, C), float32."""
        with _autocast_off(x_t.device.type):
            return self._term_b_from_gap(self._patches.gap(x_t))

    def _term_b_from_gap(self, gap: torch.Tensor) -> torch.Tensor:
        return self._term_b_with_stats(gap)[0]

    def _term_b_with_stats(self, gap: torch.Tensor) -> tuple[torch.Tensor, TermB]:
        """nu from GAP (B, C) in gap's dtype, and what its gradient through gap needs."""
        weight = self.norm.weight.to(gap.dtype)
        z, mean, rstd = torch.native_layer_norm(gap, (self.channels,), weight, self.norm.bias.to(gap.dtype),
                                                self.norm.eps)  # = F.layer_norm, which runs this kernel
        return torch.sigmoid(z), TermB(gap, mean.detach(), rstd.detach(), self.norm.weight)

    def forward(self, x_t: torch.Tensor, x_pre: torch.Tensor | None = None) -> torch.Tensor:
        if x_pre is None:
            x_pre, self._x_pre = self._x_pre, None
        if self._producer is None or x_pre is None:
            raise RuntimeError(
                f"IIEU-B site {self.site!r} has no producer input: IIEU-B needs the Conv2d/Linear that feeds it. "
                "Use actlab.convert(model, 'iieu_b'), or unit.bind(conv) and call the producer first, "
                "or pass x_pre explicitly.")
        if isinstance(self._patches, ConvPatches) and x_t.dim() == 3:
            return self._conv_tokens(x_t, x_pre)
        self._patches.check(x_t, x_pre, self.site)
        with _autocast_off(x_t.device.type):
            inv_w = inverse_filter_norms(self._producer.weight, self.eps)
        replay, replay_tensors = self._replay_for(x_t)
        silence = self.zero_patch == "silence"
        if _custom_backward_wanted():
            # term-B from a detached GAP: the autograd function adds that path's gradient itself
            with _autocast_off(x_t.device.type):
                nu, term_b = self._term_b_with_stats(self._patches.gap(x_t.detach()))
            return IIEUFunction.apply(x_t, x_pre, inv_w, nu, self.eta, self._patches, self.eps, silence, replay,
                                      replay_tensors, term_b)
        return iieu_b_plain(x_t, x_pre, inv_w, self.term_b(x_t), self.eta, self._patches, self.eps, silence)

    @torch.no_grad()
    def ii_score(self, x_t: torch.Tensor, x_pre: torch.Tensor) -> torch.Tensor:
        """rho = S + nu, the II-score before the adjuster, shaped like ``x_t`` (float32). Responses with
        ``rho < eta`` are the ones the adjuster suppresses (scaled by ``eta * exp(rho - eta) < eta``)."""
        if isinstance(self._patches, ConvPatches) and x_t.dim() == 3:  # PVT-style tokens of a conv site
            b, n, c = x_t.shape
            h, w = self._patches.output_hw(*x_pre.shape[2:])
            rho = self.ii_score(x_t.transpose(1, 2).reshape(b, c, h, w), x_pre)
            return rho.flatten(2).transpose(1, 2)
        self._patches.check(x_t, x_pre, self.site)
        x_t, x_pre = x_t.float(), x_pre.float()
        inv_x = inverse_patch_norm(self._patches.sumsq(x_pre), self._patches.patch_numel, self.eps,
                                   self.zero_patch == "silence")
        inv_w = inverse_filter_norms(self._producer.weight.float(), self.eps)
        xv, iv, wv, nv, _ = _views(self._patches, x_t, inv_x, inv_w, self.term_b(x_t), self.eta.float())
        return self._patches.unview_x(xv * (wv * iv) + nv)

    def _conv_tokens(self, x_t: torch.Tensor, x_pre: torch.Tensor) -> torch.Tensor:
        """A conv site whose output reaches the unit as tokens (B, H*W, C), e.g. PVT-v2's depthwise MLP."""
        b, n, c = x_t.shape
        h, w = self._patches.output_hw(*x_pre.shape[2:]) if x_pre.dim() == 4 else (-1, -1)
        if h * w != n:
            raise ValueError(f"IIEU-B site {self.site!r}: {n} tokens do not match the producer's "
                             f"{h}x{w} output map")
        out = self.forward(x_t.transpose(1, 2).reshape(b, c, h, w), x_pre)
        return out.flatten(2).transpose(1, 2)

    def extra_repr(self) -> str:
        prod = type(self._producer).__name__ if self._producer is not None else "unbound"
        return f"{self.channels}, producer={prod}, zero_patch={self.zero_patch!r}"


register(ActivationSpec("iieu_b", IIEUB, needs_channels=True, needs_producer=True,
                        summary="IIEU-B: norm-decoupled feature-filter similarity re-calibration"))
