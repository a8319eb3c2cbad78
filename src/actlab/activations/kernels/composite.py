"""The reference implementation of every fused operation, in plain PyTorch ops.

These are what ``set_kernels("eager")`` runs, what the C++ and Triton kernels are tested against, and
what any device without a fused kernel falls back to. Layouts (all tensors contiguous):

* IIEU-B ``planes``: x (B, C, *S) with P = prod(S) positions (a conv map as it is, or flattened to
  (B, C, P)); inv (B, G, *S) for G channel groups; nu (B, C).
* IIEU-B ``rows``: x (R, C) with R = S * T rows (S samples of T tokens); inv (R,); nu (S, C).
* inv_w and eta: (C,). Everything but x is float32 (float64 for float64 x); the math runs in that
  compute dtype and the map outputs are returned in x's dtype.
* DPA maps: x (B, C, P), pooled over P; DPA tokens: x (B, N, C), pooled over N. v is (B, C) in the
  compute dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F

# A bool tensor is one byte (0 or 1) per flag. Viewing 8 of them as one int64 word w, the product
# w * 0x0102040810204080 collects byte t's flag into bit 56 + t without carries, so (w * M) >> 56 is the
# packed byte. Unpacking looks each byte up in a 256-entry table of 8-flag words.
_GATHER = 0x0102040810204080


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def packed_size(numel: int) -> int:
    """Bytes of a bit mask of ``numel`` flags."""
    return (numel + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor -> uint8 tensor of ceil(n / 8) bytes (8 flags per byte, flag t in bit t)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad or flat.storage_offset() % 8:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(torch.int64)
    return ((words * _GATHER) >> 56).to(torch.uint8)


_UNPACK_TABLES: dict[torch.device, torch.Tensor] = {}


def _unpack_table(device: torch.device) -> torch.Tensor:
    """(256,) int64 words: entry p holds the 8 one-byte flags of packed byte p."""
    if device not in _UNPACK_TABLES:
        flags = (torch.arange(256)[:, None] >> torch.arange(8)) & 1  # (256, 8): flag t of byte p
        _UNPACK_TABLES[device] = flags.to(torch.uint8).contiguous().view(torch.int64).view(256).to(device)
    return _UNPACK_TABLES[device]


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The bool tensor of ``shape`` that ``pack_bits`` packed."""
    words = _unpack_table(packed.device)[packed.long()]
    return words.view(torch.bool)[: shape.numel()].view(shape)


def _iieu_views(x, inv, inv_w, nu, eta):
    """Broadcastable views of the per-position, per-channel and per-sample inputs against x."""
    if x.dim() != 2:  # planes (B, C, *S) -> (B, G, C/G, P)
        b, c = x.shape[:2]
        g = inv.shape[1]
        return (x.view(b, g, c // g, -1), inv.view(b, g, 1, -1), inv_w.view(1, g, -1, 1), nu.view(b, g, -1, 1),
                eta.view(1, g, -1, 1))
    r, c = x.shape  # rows (R, C) -> (S, T, C)
    s = nu.shape[0]
    return x.view(s, r // s, c), inv.view(s, r // s, 1), inv_w, nu.view(s, 1, c), eta


def iieu_rho(x, inv, inv_w, nu):
    """rho = x * inv_w * inv + nu, x's flat shape, compute dtype."""
    xv, iv, wv, nv, _ = _iieu_views(x.to(compute_dtype(x)), inv, inv_w, nu, inv_w)
    return (xv * (wv * iv) + nv).view(x.shape)


def iieu_forward(x, inv, inv_w, nu, eta):
    """out = s(rho) * x with rho = x * inv_w * inv + nu, s(r) = r above eta, eta * exp(r - eta) below."""
    ct = compute_dtype(x)
    xv, iv, wv, nv, ev = _iieu_views(x.to(ct), inv, inv_w, nu, eta)
    rho = xv * (wv * iv) + nv
    scale = torch.where(rho < ev, ev * torch.exp(torch.clamp(rho - ev, max=0.0)), rho)
    return (scale * xv).to(x.dtype).view(x.shape)


def iieu_backward(grad_out, x, inv, inv_w, nu, eta):
    """Gradients of ``iieu_forward`` w.r.t. x, inv, inv_w, nu and eta, each shaped like its input.

    d out/d x = s + x * s'(rho) * inv_w * inv;  s' = 1 above eta, eta * exp(rho - eta) below;
    d s/d eta = (1 - eta) * exp(rho - eta) below eta, 0 above.
    """
    ct = compute_dtype(x)
    xv, iv, wv, nv, ev = _iieu_views(x.to(ct), inv, inv_w, nu, eta)
    gv = grad_out.to(ct).view(xv.shape)
    a = wv * iv
    rho = xv * a + nv
    below = rho < ev
    expo = torch.exp(torch.clamp(rho - ev, max=0.0))
    s_low = expo * ev
    scale = torch.where(below, s_low, rho)
    g_scale = gv * xv
    g_rho = torch.where(below, g_scale * s_low, g_scale)
    grad_x = (gv * scale + g_rho * a).to(x.dtype).view(x.shape)
    g_rx = g_rho * xv
    grad_eta_low = torch.where(below, g_scale * expo, torch.zeros_like(expo))
    if x.dim() != 2:
        grad_inv = (g_rx * wv).sum(2).view(inv.shape)
        grad_w = (g_rx * iv).sum((0, 3)).view(-1)
        grad_nu = g_rho.sum(3).view(nu.shape)
        grad_eta = grad_eta_low.sum((0, 3)).view(-1)
    else:
        grad_inv = (g_rx * wv).sum(2).view(inv.shape)
        grad_w = (g_rx * iv).sum((0, 1))
        grad_nu = g_rho.sum(1)
        grad_eta = grad_eta_low.sum((0, 1))
    return grad_x, grad_inv, grad_w, grad_nu, grad_eta * (1 - eta)


def iieu_bn_sums(grad_out, c, inv, inv_w, nu, eta, xs, xb, hs, hb):
    """Pass 1 of IIEU-B's backward fused with its BatchNorm's, on planes: c (B, C, *S) is the BatchNorm
    input, x_t = c * xs + xb and xhat = c * hs + hb per channel. Returns the gradients w.r.t. inv, inv_w,
    nu and eta (as ``iieu_backward``) and, per (sample, channel), the sums over positions of g (the
    gradient w.r.t. x_t), g * xhat and xhat."""
    ct = compute_dtype(c)
    cf = c.to(ct).flatten(2)
    g, grad_inv, grad_w, grad_nu, grad_eta = iieu_backward(grad_out.flatten(2),
                                                           torch.addcmul(xb[:, None], cf, xs[:, None]),
                                                           inv.flatten(2), inv_w, nu, eta)
    xhat = torch.addcmul(hb[:, None], cf, hs[:, None])
    g = g.to(ct)
    return grad_inv.view(inv.shape), grad_w, grad_nu, grad_eta, g.sum(2), (g * xhat).sum(2), xhat.sum(2)


def iieu_bn_grad(grad_out, c, inv, inv_w, nu, eta, xs, xb, a, k1, k2):
    """Pass 2: dL/dc = a * g + k1 + k2 * c (a, k2 per channel, k1 per (sample, channel)), c's dtype."""
    ct = compute_dtype(c)
    cf = c.to(ct).flatten(2)
    g = iieu_backward(grad_out.flatten(2), torch.addcmul(xb[:, None], cf, xs[:, None]), inv.flatten(2), inv_w, nu,
                      eta)[0].to(ct)
    return (a[:, None] * g + k1[..., None] + k2[:, None] * cf).to(c.dtype).view(c.shape)


def term_b_forward(gap, weight, bias, eps: float):
    """IIEU-B's term-B over the channels of each sample: nu = sigmoid(LayerNorm(gap) * weight + bias) (B, C)
    in gap's dtype, and the LayerNorm's statistics mean and rstd (B, 1) that its gradient needs."""
    z, mean, rstd = torch.native_layer_norm(gap, gap.shape[-1:], weight, bias, eps)
    return torch.sigmoid(z), mean, rstd


def term_b_backward(grad_nu, nu, gap, mean, rstd, weight, bias):
    """dL/d gap (B, C) and dL/d weight, dL/d bias (C,) of ``term_b_forward`` from dL/d nu."""
    grad_z = torch.ops.aten.sigmoid_backward(grad_nu, nu)
    return torch.ops.aten.native_layer_norm_backward(grad_z, gap, gap.shape[-1:], mean, rstd, weight, bias,
                                                     [True, True, True])


def spread_add_(grad_x, grad_gap, scale: float):
    """grad_x += scale * grad_gap (B, C) at every position of each sample, in place, in grad_x's dtype:
    the gradient of a per-sample mean over positions. grad_x in IIEU-B's flat layouts: planes (B, C, *S)
    or rows (B * T, C)."""
    g = (grad_gap * scale).to(grad_x.dtype)
    if grad_x.dim() != 2:
        grad_x.add_(g.view(*g.shape, *(1,) * (grad_x.dim() - 2)))
    else:
        grad_x.view(g.shape[0], -1, g.shape[1]).add_(g.unsqueeze(1))
    return grad_x


def term_b_backward_into_(grad_x, grad_nu, nu, gap, mean, rstd, weight, bias, scale: float):
    """Term-B's backward added into x_t's gradient: grad_x += scale * dL/d gap at every position of each
    sample, in place (``spread_add_``; scale = 1 / positions, the mean's gradient), from dL/d nu (B, C)
    through ``term_b_forward`` with the LayerNorm's ``weight`` and ``bias``. Returns their gradients (C,)."""
    grad_gap, grad_weight, grad_bias = term_b_backward(grad_nu, nu, gap, mean, rstd, weight, bias)
    spread_add_(grad_x, grad_gap, scale)
    return grad_weight, grad_bias


class NormSiteGrads(NamedTuple):
    """The gradients ``iieu_bn_backward`` returns: the BatchNorm input's (c's shape and dtype), the inverse
    patch norms', the unit's (inv_w, nu, eta), the BatchNorm's weight and bias, and term-B's LayerNorm
    weight and bias. With term-B, nu is computed inside the unit and its gradient is None; without
    term-B, the LayerNorm's gradients are None."""

    c: torch.Tensor
    inv: torch.Tensor
    inv_w: torch.Tensor
    nu: torch.Tensor | None
    eta: torch.Tensor
    norm_weight: torch.Tensor
    norm_bias: torch.Tensor
    ln_weight: torch.Tensor | None
    ln_bias: torch.Tensor | None


def iieu_bn_backward(grad_out, c, inv, inv_w, nu, eta, terms, term_b, batch_stats: bool,
                     sums=None, grad=None) -> NormSiteGrads:
    """IIEU-B's backward through the training BatchNorm that made its input, x_t = BN(c), on planes c
    (B, C, *S): two passes over c and grad_out (``sums`` and ``grad``, by default this module's
    ``iieu_bn_sums`` and ``iieu_bn_grad``) and per-channel arithmetic between them, instead of the unit's
    gradient map, term-B's spread over it and the BatchNorm's own backward.

    ``terms``: (xs, xb, hs, hb), x_t = c * xs + xb and xhat = c * hs + hb per channel. ``term_b``: (gap,
    mean, rstd, weight) of term-B's LayerNorm (``term_b_forward`` of gap = GAP(x_t)), or None when nu has
    no gradient path to x_t. With g the gradient w.r.t. x_t, term-B's spread included:

        dL/d beta = sum g,  dL/d gamma = sum g * xhat,  A = gamma / sqrt(var + eps) = xs
        batch statistics: dL/dc = A * (g - mean(g) - xhat * mean(g * xhat));  running statistics: A * g
    """
    xs, xb, hs, hb = terms
    grad_inv, grad_w, grad_nu, grad_eta, sum_g, sum_gh, sum_h = (sums or iieu_bn_sums)(
        grad_out, c, inv, inv_w, nu, eta, xs, xb, hs, hb)
    positions = math.prod(c.shape[2:])
    ln_grads = (None, None)
    if term_b is not None:
        gap, mean, rstd, weight = term_b
        grad_z = torch.ops.aten.sigmoid_backward(grad_nu, nu)
        grad_gap, grad_ln_weight, _ = torch.ops.aten.native_layer_norm_backward(
            grad_z, gap, gap.shape[-1:], mean, rstd, weight, None, [True, True, False])
        ln_grads = (grad_ln_weight, grad_z.sum(0))
        spread = grad_gap.to(sum_g.dtype) / positions
        sum_g = sum_g + positions * spread
        sum_gh = sum_gh + spread * sum_h
    else:
        spread = torch.zeros_like(sum_g)
    grad_beta, grad_gamma = sum_g.sum(0), sum_gh.sum(0)
    if batch_stats:
        n = c.shape[0] * positions
        k1 = xs * (spread - (grad_beta + grad_gamma * hb) / n)
        k2 = -xs * grad_gamma * hs / n
    else:
        k1, k2 = xs * spread, torch.zeros_like(xs)
    grad_c = (grad or iieu_bn_grad)(grad_out, c, inv, inv_w, nu, eta, xs, xb, xs, k1, k2)
    grad_nu = grad_nu if term_b is None else None  # term-B's nu is inside the unit
    return NormSiteGrads(grad_c, grad_inv, grad_w, grad_nu, grad_eta, grad_gamma, grad_beta, *ln_grads)


def batchnorm_terms(c, weight, bias, eps: float, moments=None):
    """What IIEU-B needs of a training-mode BatchNorm of c (B, C, *S) with affine parameters ``weight``
    and ``bias`` (C,) or None: the per-channel coefficients of x_t = c * xs + xb and xhat = c * hs + hb and
    GAP(x_t) (B, C), all in the compute dtype, from the batch statistics (``moments``, by default this
    module's ``batch_moments``)."""
    plane_means, mean, var = (moments or batch_moments)(c)
    xs, xb, hs, hb = _normalising_terms(mean, var, weight, bias, eps)
    ct = compute_dtype(c)
    return xs.to(ct), xb.to(ct), hs.to(ct), hb.to(ct), (plane_means * xs + xb).to(ct)


def running_terms(running_mean, running_var, weight, bias, eps: float, ct: torch.dtype):
    """The coefficients (xs, xb, hs, hb) of an eval-mode BatchNorm (its running statistics), x_t = c * xs + xb
    and xhat = c * hs + hb per channel, computed in float64 and returned in ``ct``."""
    terms = _normalising_terms(running_mean.double(), running_var.double(), weight, bias, eps)
    return tuple(t.to(ct) for t in terms)


def _normalising_terms(mean, var, weight, bias, eps: float):
    """A BatchNorm's per-channel coefficients from its float64 mean and biased variance (C,): xhat =
    (c - mean) / sqrt(var + eps) = c * hs + hb, x_t = xhat * weight + bias = c * xs + xb; float64."""
    hat_scale = (var + eps).rsqrt()
    scale = hat_scale * weight.detach().double() if weight is not None else hat_scale
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.detach().double()
    return scale, shift, hat_scale, -mean * hat_scale


def site_stats_numel(b: int, c: int) -> int:
    """The length of a conv-BN site's statistics (``bn_site_stats``) for B samples and C channels."""
    return 6 * c + 2 * b * c + 2 * b


def site_stats_parts(stats, b: int, c: int):
    """Views of a conv-BN site's statistics, one flat compute-dtype buffer that the kernels read at fixed
    offsets: the BatchNorm's coefficients (xs, xb, hs, hb) (C,) each, GAP(x_t) (B, C), term-B's nu (B, C),
    its LayerNorm's mean and rstd (B, 1) each, and the producer filters' inverse norms inv_w and squared
    norms (C,) each."""
    terms, gap, nu, mean, rstd, inv_w, w_sumsq = stats.split([4 * c, b * c, b * c, b, b, c, c])
    return terms.view(4, c).unbind(0), gap.view(b, c), nu.view(b, c), mean.view(b, 1), rstd.view(b, 1), inv_w, w_sumsq


def bn_site_stats(c, weight, bias, eps: float, running, ln_weight, ln_bias, ln_eps: float, filters,
                  filter_eps: float, moments=None):
    """What IIEU-B at a conv-BN site needs of its BatchNorm (on c (B, C, *S), with affine ``weight`` and
    ``bias`` or None; ``running`` = (running_mean, running_var) for an eval-mode BatchNorm, else None for
    the batch statistics), of its term-B (LayerNorm ``ln_weight``, ``ln_bias``, ``ln_eps``) and of the
    producer's ``filters`` (C, ...) (``rows_inv_norm`` with ``filter_eps``), packed as ``site_stats_parts``
    reads them. ``moments``: as ``batchnorm_terms``'."""
    ct = compute_dtype(c)
    if running is None:
        *terms, gap = batchnorm_terms(c, weight, bias, eps, moments)
    else:
        terms = running_terms(*running, weight, bias, eps, ct)
        plane_means = c.flatten(2).mean(2, dtype=ct)
        gap = plane_means * terms[0] + terms[1]
    nu, mean, rstd = term_b_forward(gap, ln_weight, ln_bias, ln_eps)
    inv_w, w_sumsq = rows_inv_norm(filters.to(ct), filter_eps, -1.0)
    return torch.cat([t.reshape(-1) for t in (*terms, gap, nu, mean, rstd, inv_w, w_sumsq)])


def bn_site_forward(x, inv, eta, stats, forward=None):
    """IIEU-B's output at a conv-BN site (``forward``, by default this module's ``iieu_forward``, with the
    site's nu and inv_w) on planes x (B, C, *S)."""
    _, _, nu, _, _, inv_w, _ = site_stats_parts(stats, x.shape[0], x.shape[1])
    return (forward or iieu_forward)(x, inv, inv_w, nu, eta)


def bn_site_backward(grad_out, c, inv, eta, stats, ln_weight, batch_stats: bool, sums=None,
                     grad=None) -> NormSiteGrads:
    """``iieu_bn_backward`` with term-B, from the site's statistics (``bn_site_stats``)."""
    terms, gap, nu, mean, rstd, inv_w, _ = site_stats_parts(stats, c.shape[0], c.shape[1])
    return iieu_bn_backward(grad_out, c, inv, inv_w, nu, eta, terms, (gap, mean, rstd, ln_weight), batch_stats,
                            sums, grad)


def bn_site_filter_grad(filters, stats, grad_inv_w, filter_eps: float, backward=None):
    """dL/d filters (their shape and dtype) through the site's inverse filter norms, from dL/d inv_w
    (``backward``, by default this module's ``rows_inv_norm_backward``, with the kept squared norms)."""
    return (backward or rows_inv_norm_backward)(filters, stats[-filters.shape[0]:], grad_inv_w, filter_eps, -1.0)


class LinearSiteStats(NamedTuple):
    """Views of a Linear site's statistics (``linear_site_stats``), one flat compute-dtype buffer that the
    kernels read at fixed offsets (``linear_site_offsets``), for x_pre (S, *, K) of R = S * T rows and C
    output features: the rows' inverse and squared norms (R,) each, the mean of each sample's rows of
    x_pre (S, K), GAP(x_t) (S, C), term-B's nu (S, C), its LayerNorm's mean and rstd (S,) each, the
    filters' inverse and squared norms (C,) each; then what backward writes for x_pre's gradient: dL/d of
    the rows' inverse norms (R,) and the per-sample term of dL/d x_pre (S, K), the same at each of the
    sample's rows."""

    inv_x: torch.Tensor
    sumsq: torch.Tensor
    pre_mean: torch.Tensor
    gap: torch.Tensor
    nu: torch.Tensor
    mean: torch.Tensor
    rstd: torch.Tensor
    inv_w: torch.Tensor
    w_sumsq: torch.Tensor
    grad_inv: torch.Tensor
    input_spread: torch.Tensor


def _linear_site_sizes(s: int, r: int, c: int, k: int) -> list[int]:
    return [r, r, s * k, s * c, s * c, s, s, c, c, r, s * k]


def linear_site_offsets(s: int, r: int, c: int, k: int) -> LinearSiteStats:
    """Where each part of ``LinearSiteStats`` starts in the buffer (ints), and its length is the total."""
    sizes = _linear_site_sizes(s, r, c, k)
    return LinearSiteStats(*(sum(sizes[:i]) for i in range(len(sizes))))


def linear_site_numel(s: int, r: int, c: int, k: int) -> int:
    return sum(_linear_site_sizes(s, r, c, k))


def linear_site_parts(stats, s: int, r: int, c: int, k: int) -> LinearSiteStats:
    """The parts of a Linear site's statistics as views of the buffer."""
    inv_x, sumsq, pre_mean, gap, nu, mean, rstd, inv_w, w_sumsq, grad_inv, spread = stats.split(
        _linear_site_sizes(s, r, c, k))
    return LinearSiteStats(inv_x, sumsq, pre_mean.view(s, k), gap.view(s, c), nu.view(s, c), mean.view(s, 1),
                           rstd.view(s, 1), inv_w, w_sumsq, grad_inv, spread.view(s, k))


def site_rows(t: torch.Tensor):
    """(S, rows, features) of a Linear site's tensor (S, *, F): S samples of T tokens."""
    s, f = t.shape[0], t.shape[-1]
    return s, t.numel() // f, f


def _as_product(t: torch.Tensor, product_dtype: torch.dtype, ct: torch.dtype) -> torch.Tensor:
    """t rounded to the dtype the Linear multiplied in (its autocast dtype), in ``ct``."""
    return t.to(product_dtype).to(ct)


def linear_site_stats(x_pre, product_dtype, weight, bias, ln_weight, ln_bias, ln_eps: float, eps: float,
                      silent: float, filter_eps: float):
    """What IIEU-B needs at a site x_t = Linear(x_pre) (``weight`` (C, K), ``bias`` (C,) or None, multiplied
    in ``product_dtype``, x_t's dtype) with x_pre (S, *, K), packed as ``linear_site_parts`` reads them.
    GAP(x_t) is taken through the Linear, from the mean of each sample's rows of x_pre:
    GAP(x_t) = mean(x_pre) @ weight^T + bias, with the operands rounded to ``product_dtype`` as the Linear
    rounds them; then term-B (LayerNorm ``ln_weight``, ``ln_bias``, ``ln_eps``), the rows' inverse norms
    (``rows_inv_norm`` with ``eps``, ``silent``) and the filters' (``filter_eps``). The backward part is
    left unwritten (zeros here)."""
    ct = torch.float64 if product_dtype == torch.float64 else torch.float32
    s, r, k = site_rows(x_pre)
    rows = x_pre.reshape(r, k)
    inv_x, sumsq = rows_inv_norm(rows, eps, silent)
    pre_mean = _as_product(rows, product_dtype, ct).view(s, -1, k).mean(1)
    gap = pre_mean @ _as_product(weight, product_dtype, ct).T
    if bias is not None:
        gap = gap + _as_product(bias, product_dtype, ct)
    nu, mean, rstd = term_b_forward(gap, ln_weight.to(ct), ln_bias.to(ct), ln_eps)
    inv_w, w_sumsq = rows_inv_norm(weight.to(ct), filter_eps, -1.0)
    backward_part = inv_x.new_zeros(r + s * k)
    return torch.cat([t.reshape(-1).to(ct) for t in (inv_x, sumsq, pre_mean, gap, nu, mean, rstd, inv_w, w_sumsq,
                                                      backward_part)])


def linear_site_forward(x, eta, stats, k: int, forward=None):
    """IIEU-B's output at a Linear site (``forward``, by default this module's ``iieu_forward``, on x's rows
    with the site's statistics); x (S, *, C), x_pre had ``k`` features."""
    s, r, c = site_rows(x)
    parts = linear_site_parts(stats, s, r, c, k)
    return (forward or iieu_forward)(x.reshape(r, c), parts.inv_x, parts.inv_w, parts.nu, eta).view(x.shape)


class LinearSiteGrads(NamedTuple):
    """What ``linear_site_backward`` gives: the gradients of x_t (its shape and dtype), of eta, of term-B's
    LayerNorm weight and bias, of the producer's filters (their shape: through their inverse norms and
    through GAP) and of its bias (None without one), the parameters' in the compute dtype."""

    x: torch.Tensor
    eta: torch.Tensor
    ln_weight: torch.Tensor
    ln_bias: torch.Tensor
    filters: torch.Tensor
    bias: torch.Tensor | None


def linear_site_backward(grad_out, x, eta, stats, weight, has_bias: bool, ln_weight, filter_eps: float,
                         backward=None) -> LinearSiteGrads:
    """IIEU-B's backward at a Linear site (``backward``, by default this module's ``iieu_backward``, on the
    rows), term-B's through GAP(x_t) = mean(x_pre) @ weight^T + bias taken into the filters', the bias' and
    x_pre's gradients instead of x_t's. ``x``: x_t recomputed, of grad_out's shape or its rows (R, C).
    x_pre's part (dL/d of the rows' inverse norms and the per-sample term) is written into the statistics'
    backward part for ``linear_site_input_grad``."""
    s, r, c = site_rows(grad_out)
    k = weight.shape[1]
    ct = compute_dtype(x)
    parts = linear_site_parts(stats, s, r, c, k)
    grad_x, grad_inv, grad_w, grad_nu, grad_eta = (backward or iieu_backward)(
        grad_out.reshape(r, c), x.reshape(r, c), parts.inv_x, parts.inv_w, parts.nu, eta)
    grad_z = torch.ops.aten.sigmoid_backward(grad_nu, parts.nu)
    grad_gap, grad_ln_weight, _ = torch.ops.aten.native_layer_norm_backward(
        grad_z, parts.gap, (c,), parts.mean, parts.rstd, ln_weight.to(ct), None, [True, True, False])
    scratch = linear_site_parts(stats.data, s, r, c, k)  # the backward part is scratch, no autograd version: a
    scratch.grad_inv.copy_(grad_inv)  # retained graph's second backward reads the statistics again
    scratch.input_spread.copy_(grad_gap @ _as_product(weight, x.dtype, ct) / (r // s))
    grad_filters = rows_inv_norm_backward(weight.to(ct), parts.w_sumsq, grad_w, filter_eps, -1.0)
    return LinearSiteGrads(grad_x.view(grad_out.shape), grad_eta, grad_ln_weight, grad_z.sum(0),
                           grad_filters + grad_gap.T @ parts.pre_mean, grad_gap.sum(0) if has_bias else None)


def linear_site_input_grad(x_pre, stats, c: int, eps: float, silent: float, add=None, into_add: bool = False):
    """dL/d x_pre (x_pre's shape and dtype) from what ``linear_site_backward`` wrote into the statistics:
    through the rows' inverse norms (``eps``, ``silent``) plus the per-sample term at each row, plus
    ``add`` (x_pre's shape) when given, written over ``add`` when ``into_add``."""
    s, r, k = site_rows(x_pre)
    parts = linear_site_parts(stats, s, r, c, k)
    rows = x_pre.reshape(s, r // s, k).to(stats.dtype)
    grad_sumsq = inv_norm_grad_sumsq(parts.sumsq, parts.grad_inv, eps, silent).view(s, r // s, 1)
    grad = (2 * rows * grad_sumsq + parts.input_spread[:, None]).view(x_pre.shape).to(x_pre.dtype)
    if add is None:
        return grad
    return add.add_(grad) if into_add else add + grad


def batch_moments(x):
    """x (B, C, *S) -> the mean of each plane (B, C) and, per channel over B and S, the mean and the biased
    variance (C,), all float64: the statistics a training-mode BatchNorm normalises x with."""
    b, c = x.shape[:2]
    planes = x.reshape(b, c, -1).to(compute_dtype(x))
    plane_var, plane_mean = torch.var_mean(planes, dim=2, correction=0)
    return combine_moments(plane_mean.double(), plane_var.double())


def combine_moments(plane_mean, plane_var):
    """Per-plane means and biased variances (B, C) -> (plane_mean, the per-channel mean and biased
    variance (C,) over all planes of a channel)."""
    mean = plane_mean.mean(0)
    var = (plane_var + (plane_mean - mean).square()).mean(0)
    return plane_mean, mean, var


def _sample_channel(w, x):
    """(B, C) values as a view broadcasting against x: maps (B, C, *S), tokens (B, N, C) or (B, C)."""
    if x.dim() == 3:
        return w[:, None, :]
    return w.view(*w.shape, *(1,) * (x.dim() - 2))


def _positions_dims(x) -> tuple:
    return (1,) if x.dim() == 3 else tuple(range(2, x.dim()))


@dataclass(frozen=True)
class CouplerNet:
    """The Dynamic Coupler's weight network: pooled branches (B, 2C) -> fusion weights (B, 2, C).

    a = LayerNorm_2C(pooled) as two rows of C; h = fc1 a (C -> H, shared by both rows); h' = IIEU-B of h
    at that Linear site (term-B: each row standardised by its mean and unbiased std plus ``row_eps``, then
    its own affine ``row_weight[i]``, ``row_bias[i]``); z = LayerNorm_2C(fc2 h'); softmax over the rows.
    The tensors are the coupler's parameters themselves, in ``NAMES`` order."""

    NAMES: ClassVar[tuple[str, ...]] = ("in_weight", "in_bias", "fc1", "eta", "row_weight", "row_bias", "fc2",
                                        "out_weight", "out_bias")

    in_weight: torch.Tensor  # (2C,)
    in_bias: torch.Tensor  # (2C,)
    fc1: torch.Tensor  # (H, C)
    eta: torch.Tensor  # (H,)
    row_weight: torch.Tensor  # (2, H)
    row_bias: torch.Tensor  # (2, H)
    fc2: torch.Tensor  # (C, H)
    out_weight: torch.Tensor  # (2C,)
    out_bias: torch.Tensor  # (2C,)
    silent: float  # the norm below which a row a_i is silenced (its term-S is 0); < 0: never
    ln_eps: float = 1e-6
    row_eps: float = 1e-6
    eps: float = 1e-8

    @property
    def channels(self) -> int:
        return self.fc1.shape[1]

    @property
    def hidden(self) -> int:
        return self.fc1.shape[0]

    def tensors(self) -> tuple:
        return tuple(getattr(self, name) for name in self.NAMES)

    def with_tensors(self, tensors) -> "CouplerNet":
        return replace(self, **dict(zip(self.NAMES, tensors, strict=True)))


def row_standardize(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(h - mean) / (std + eps) over the last dim, with the unbiased std (the published coupler's
    normaliser, not LayerNorm's sqrt(biased var + eps)). A single feature has no spread: 0."""
    if h.shape[-1] == 1:
        return torch.zeros_like(h)
    centered = h - h.mean(-1, keepdim=True)
    return centered / (h.std(-1, correction=1, keepdim=True) + eps)


def coupler_iieu(h, a, net: CouplerNet):
    """IIEU-B of the hidden rows h (B, 2, H) = fc1 a, a (B, 2, C): s(rho) * h with
    rho = h / ((||fc1_j|| + eps) (||a_i|| + eps)) + sigmoid(row_standardize(h) * row_weight + row_bias)."""
    nu = torch.sigmoid(row_standardize(h, net.row_eps) * net.row_weight + net.row_bias)
    inv_w = 1.0 / (torch.linalg.vector_norm(net.fc1, dim=1) + net.eps)
    norm_a = torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    inv_x = torch.where(norm_a < net.silent, torch.zeros_like(norm_a), 1.0 / (norm_a + net.eps))
    rho = h * inv_w * inv_x + nu
    scale = torch.where(rho >= net.eta, rho, net.eta * torch.exp(torch.clamp(rho - net.eta, max=0.0)))
    return scale * h


def coupler_weights(pooled, net: CouplerNet):
    """Fusion weights (B, 2, C) from the pooled branches (B, 2C), in pooled's dtype (autocast off)."""
    c = net.channels
    with torch.autocast(pooled.device.type, enabled=False):
        a = F.layer_norm(pooled, (2 * c,), net.in_weight, net.in_bias, net.ln_eps).view(-1, 2, c)
        h = coupler_iieu(F.linear(a, net.fc1), a, net)
        z = F.layer_norm(F.linear(h, net.fc2).flatten(1), (2 * c,), net.out_weight, net.out_bias, net.ln_eps)
        return z.view(-1, 2, c).softmax(dim=1)


def coupler_weights_backward(pooled, net: CouplerNet, grad_lam, scale: float):
    """scale * dL/d pooled (B, 2C) and dL/d of each of ``net.tensors()``, from dL/d weights (B, 2, C)."""
    def weights(pooled, *tensors):
        return coupler_weights(pooled, net.with_tensors(tensors))

    _, vjp = torch.func.vjp(weights, pooled, *net.tensors())
    grads = vjp(grad_lam)
    return grads[0] * scale, grads[1:]


def coupler_pool(main, shortcut):
    """[GAP(main), GAP(shortcut)] (B, 2C) in the compute dtype; maps (B, C, *S), tokens (B, N, C), (B, C)."""
    ct, dims = compute_dtype(main), _positions_dims(main)
    if not dims:
        return torch.cat([main, shortcut], 1).to(ct)
    return torch.cat([main.mean(dims, dtype=ct), shortcut.mean(dims, dtype=ct)], 1)


def coupler_forward(main, shortcut, lam):
    """The Dynamic Coupler's fusion out = l1 * main + l2 * shortcut with lam (B, 2, C) = (l1, l2) per sample
    and channel (channels at dim 1 of maps (B, C, *S), last of tokens (B, N, C)), computed in main's dtype."""
    w1, w2 = lam.to(main.dtype).unbind(1)
    return main * _sample_channel(w1, main) + shortcut * _sample_channel(w2, shortcut)


def coupler_sums(grad, out, shortcut):
    """Sums over positions of grad * out and of grad * shortcut, (B, C) each, in the compute dtype."""
    ct, dims = compute_dtype(grad), _positions_dims(grad)
    g = grad.to(ct)
    if not dims:
        return g * out.to(ct), g * shortcut.to(ct)
    return (g * out.to(ct)).sum(dims), (g * shortcut.to(ct)).sum(dims)


def coupler_weight_grads(grad, out, shortcut, lam):
    """dL/d lam (B, 2, C) of ``coupler_forward`` from dL/d out, without ``main``: the sum of grad * main over
    positions is (sum of grad * out - l2 * sum of grad * shortcut) / l1."""
    sum_out, sum_shortcut = coupler_sums(grad, out, shortcut)
    w1, w2 = lam.unbind(1)
    return torch.stack([(sum_out - w2 * sum_shortcut) / w1, sum_shortcut], 1)


def coupler_grads(grad, lam, add):
    """The branch gradients grad * l1 + add[:, :C] and grad * l2 + add[:, C:], lam (B, 2, C) and add
    (B, 2C) broadcast over positions, in grad's dtype."""
    dt = grad.dtype
    w1, w2 = lam.to(dt).unbind(1)
    add1, add2 = add.to(dt).view(lam.shape).unbind(1)
    return (grad * _sample_channel(w1, grad) + _sample_channel(add1, grad),
            grad * _sample_channel(w2, grad) + _sample_channel(add2, grad))



def coupler_state_parts(state, b: int, c: int):
    """The pooled branches (B, 2C) and the fusion weights (B, 2, C) in a coupler's forward state, one flat
    compute-dtype buffer that the kernels read at fixed offsets (the weights from 2BC on)."""
    pooled, lam = state.split([2 * b * c, 2 * b * c])
    return pooled.view(b, 2 * c), lam.view(b, 2, c)


def coupler_fusion(main, shortcut, net: CouplerNet, pool=None, weights=None, forward=None):
    """The Dynamic Coupler's fusion out = l1 * main + l2 * shortcut with (l1, l2) from the pooled branches
    through the weight network: (out, state), the state (``coupler_state_parts``) for
    ``coupler_fusion_backward``. ``pool``, ``weights``, ``forward``: by default this module's
    ``coupler_pool``, ``coupler_weights``, ``coupler_forward``."""
    pooled = (pool or coupler_pool)(main, shortcut)
    lam = (weights or coupler_weights)(pooled, net)
    out = (forward or coupler_forward)(main, shortcut, lam)
    return out, torch.cat([pooled.reshape(-1), lam.reshape(-1)])


def coupler_fusion_backward(grad, out, shortcut, state, net: CouplerNet, weight_grads=None, weights_backward=None,
                            grads=None):
    """dL/d main, dL/d shortcut and dL/d each of ``net.tensors()`` (a tuple) from dL/d out, without ``main``:
    one pass for the weights' gradient (``weight_grads``), the network's backward (``weights_backward``),
    one pass writing both branch gradients with the pooling's gradient spread in (``grads``); by default
    this module's ``coupler_weight_grads``, ``coupler_weights_backward``, ``coupler_grads``."""
    b, c = grad.shape[0], net.channels
    pooled, lam = coupler_state_parts(state, b, c)
    grad_lam = (weight_grads or coupler_weight_grads)(grad, out, shortcut, lam)
    positions = math.prod(grad.shape[d] for d in _positions_dims(grad))
    grad_pooled, grad_params = (weights_backward or coupler_weights_backward)(pooled, net, grad_lam, 1.0 / positions)
    grad_main, grad_shortcut = (grads or coupler_grads)(grad, lam, grad_pooled)
    return grad_main, grad_shortcut, grad_params

def channel_sumsq(x, groups: int, ct: torch.dtype):
    """Sum of squares over each group's channels: (B, C, *S) -> (B, G, *S) in ``ct``."""
    b, c = x.shape[:2]
    return x.to(ct).square().view(b, groups, c // groups, *x.shape[2:]).sum(2)


def channel_scale(x, scale, add=None, into_add: bool = False):
    """x (B, C, *S) times its group's ``scale`` (B, G, *S) at every position, computed in scale's dtype,
    returned in x's; plus ``add`` (x's shape) when given, written over ``add`` when ``into_add``."""
    b, c = x.shape[:2]
    g = scale.shape[1]
    grouped = x.to(scale.dtype).view(b, g, c // g, *x.shape[2:])
    scaled = (grouped * scale.unsqueeze(2)).view(x.shape).to(x.dtype)
    if add is None:
        return scaled
    return add.add_(scaled) if into_add else add + scaled


def rows_inv_norm(x, eps: float, silent: float):
    """x (R, K) or (R, *) (each row x[r] flattened: conv filters as they are) -> inv (R,) = 1 / (||x_r|| + eps),
    0 where ||x_r|| < silent (silent < 0: never), and the squared norms (R,), both in the compute dtype."""
    sumsq = x.to(compute_dtype(x)).square().flatten(1).sum(1)
    norm = sumsq.sqrt()
    inv = 1.0 / (norm + eps)
    if silent >= 0:
        inv = torch.where(norm < silent, torch.zeros_like(inv), inv)
    return inv, sumsq


def inverse_norm(sumsq, eps: float, silent: float):
    """1 / (sqrt(sumsq) + eps), 0 where the norm is below ``silent`` (silent < 0: never); sumsq's shape."""
    norm = sumsq.sqrt()
    inv = 1.0 / (norm + eps)
    if silent >= 0:
        inv = torch.where(norm < silent, torch.zeros_like(inv), inv)
    return inv


def channel_inv_norm(x, groups: int, ct: torch.dtype, eps: float, silent: float):
    """Inverse norms of each position's group of channels (a pointwise producer's patches): ``inverse_norm``
    of ``channel_sumsq``. Returns (inv, sumsq), both (B, G, *S) in ``ct``."""
    sumsq = channel_sumsq(x, groups, ct)
    return inverse_norm(sumsq, eps, silent), sumsq


def channel_norm_grad_scale(x, sumsq, grad_inv, eps: float, silent: float, add=None, into_add: bool = False):
    """dL/d x of ``channel_inv_norm`` from dL/d inv: x times its group's 2 * dL/d sumsq, plus ``add`` as
    ``channel_scale`` does."""
    return channel_scale(x, 2 * inv_norm_grad_sumsq(sumsq, grad_inv, eps, silent), add, into_add)


def window_inv_norm(sq, window, eps: float, silent: float):
    """Inverse patch norms of a convolution: the per-position group sums of squares ``sq`` (B, G, H, W)
    summed over each receptive field of ``window`` (the producer's geometry: ``kernel_size``, ``stride``,
    ``dilation``, ``pads``, with its ``window_sum``), then ``inverse_norm``. Returns (inv, sumsq), both
    (B, G, H', W') in sq's dtype."""
    sumsq = window.window_sum(sq)
    return inverse_norm(sumsq, eps, silent), sumsq


def window_inv_norm_backward(sumsq, grad_inv, hw, window, eps: float, silent: float):
    """The factor f (B, G, H, W) with dL/d x_pre = x_pre * f from dL/d inv of ``window_inv_norm``:
    2 * the window sum's adjoint of dL/d sumsq."""
    return 2 * window.window_sum_backward(inv_norm_grad_sumsq(sumsq, grad_inv, eps, silent), hw)


def inv_norm_grad_sumsq(sumsq, grad_inv, eps: float, silent: float):
    """dL/d sumsq from dL/d inv; 0 at a zero norm (the subgradient torch.linalg.norm takes) and where
    the norm is silenced."""
    norm = sumsq.sqrt()
    inv = 1.0 / (norm + eps)
    live = norm > 0
    if silent >= 0:
        live = live & (norm >= silent)
    safe = torch.where(live, norm, torch.ones_like(norm))
    return torch.where(live, -grad_inv * inv.square() / (2 * safe), torch.zeros_like(norm))


def rows_inv_norm_backward(x, sumsq, grad_inv, eps: float, silent: float):
    """dL/d x (x's shape and dtype) of ``rows_inv_norm`` from dL/d inv."""
    grad_sumsq = inv_norm_grad_sumsq(sumsq, grad_inv, eps, silent)
    return (2 * x.to(sumsq.dtype) * grad_sumsq.view(-1, *(1,) * (x.dim() - 1))).to(x.dtype)


def rows_norm_grad_scale(x, sumsq, grad_inv, eps: float, silent: float, add=None, into_add: bool = False):
    """``rows_inv_norm_backward`` plus ``add`` (x's shape) when given, written over ``add`` when
    ``into_add``."""
    grad = rows_inv_norm_backward(x, sumsq, grad_inv, eps, silent)
    if add is None:
        return grad
    return add.add_(grad) if into_add else add + grad


def pass_mask(x, tau: float):
    """TAU's gradient mask x >= tau (x == tau included; NaN: no), bit-packed."""
    return pack_bits(x >= tau)


def masked_grad(grad, passes):
    """grad where the packed mask ``passes`` (of grad's shape) is set, else 0."""
    return torch.where(unpack_bits(passes, grad.shape), grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


def tau_pool(x, tau: float, tokens: bool):
    """TAU (0 if x < tau else x: NaN stays NaN), the mean (compute dtype) of x over positions (maps) or tokens, and the
    bit-packed pass mask x >= tau. Backward needs only the mask, never the output, so an in-place operation on
    the output after the unit does not change the gradient."""
    out = torch.where(x < tau, torch.zeros_like(x), x)  # NaN passes, as through ReLU
    ct = compute_dtype(x)
    v = x.mean(1, dtype=ct) if tokens else x.mean(2, dtype=ct)
    return out, v, pass_mask(x, tau)


def tau_pool_backward(grad_out, passes, grad_v, tokens: bool, cls: bool = False):
    """dL/d x of ``tau_pool``: grad_out where the packed mask ``passes`` is set, plus grad_v's mean spread
    (``cls``: grad_v added to token 0). Maps may keep their spatial dims: grad_out (B, C, *S)."""
    if not tokens and grad_out.dim() > 3:
        return tau_pool_backward(grad_out.flatten(2), passes, grad_v, tokens).view(grad_out.shape)
    grad = masked_grad(grad_out, passes)
    return spread_pooled_grad(grad, grad_v, tokens, cls)


def spread_pooled_grad(grad, grad_v, tokens: bool, cls: bool = False):
    """grad plus the pooling's gradient from grad_v (B, C): its mean spread over positions or tokens, or
    (``cls``) onto token 0."""
    if grad_v is None:
        return grad
    if cls:
        grad[:, 0] += grad_v.to(grad.dtype)
        return grad
    if tokens:
        return grad + (grad_v / grad.shape[1]).unsqueeze(1).to(grad.dtype)
    return grad + (grad_v / grad.shape[2]).unsqueeze(2).to(grad.dtype)


def dpa_forward(x, tau: float, tokens: bool, memories=None, labels=None, count=None, cls: bool = False,
                pool=None):
    """One DPA site's forward: ``tau_pool`` of x and, given ``memories`` = (value memory (K, C), grad
    memory (K, C)) and ``labels`` (B,), the mask ``dpa_mask`` of the memories' rows at the labels (None
    without). ``count`` = (a 0-dim buffer, an int): the value is stored in the buffer, which a GPU kernel
    does in the same launch. Maps may keep their spatial dims: x (B, C, *S), pooled over S. ``cls``
    (tokens): v is token 0's values, not the mean. ``pool``: the ``tau_pool`` to call (a backend's own),
    this module's by default.

    Returns (out, v, passes, mask)."""
    flat = x.flatten(2) if not tokens and x.dim() > 3 else x
    out, v, passes = (pool or tau_pool)(flat, tau, tokens)
    if cls:
        v = x[:, 0].to(compute_dtype(x))
    mask = None if memories is None else dpa_mask(v, memories[0], memories[1], labels, tau, True)
    if count is not None:
        count[0].fill_(count[1])
    # back to x's shape as a tensor of its own, not a view: an autograd function's output that is a view of
    # another of its tensors could not be modified in place after the unit (Dropout(inplace=True), +=)
    return (out if flat is x else torch.ops.aten._unsafe_view(out, x.shape)), v, passes, mask


def pooled_signs(g):
    """1 where g > 0, -1 elsewhere, g itself where it is not finite (the memory rule leaves such a sample
    out)."""
    return torch.where(torch.isfinite(g), torch.where(g > 0, 1.0, -1.0).to(g.dtype), g)


def ema_update_(memory, labels, values, alpha: float, order=None, signs: bool = False, after: bool = True,
                enabled=None):
    """DPA's per-class memory rule ``memory[y_i] += alpha * (values_i - memory[y_i])`` for i in batch
    order, in place; a sample whose values are not all finite is left out.

    Args:
        memory: (K, C), updated in place.
        labels: (B,) int64 classes in [0, K).
        values: (B, C).
        alpha: weight of the newest sample.
        order: ``torch.sort(labels, stable=True)``, (sorted labels, permutation), when the caller has it
            (the GPU kernel runs over the samples in class order); unused here.
        signs: update with the signs of ``values`` (``pooled_signs``) instead of the values.
        after: return the rows; else None.
        enabled: None, or a 0-dim bool tensor: update only where it is true (decided on the device, no
            host read); where false the rows are memory[labels] as they stand.
    Returns:
        (B, C) in memory's dtype, row i = memory[labels[i]] right after sample i's own update, or None.
    """
    if signs:
        values = pooled_signs(values)
    rows, updated = closed_form_ema(memory, labels, values.to(memory.dtype), alpha)
    if enabled is not None:
        rows = torch.where(enabled, rows, memory.index_select(0, labels))
        updated = torch.where(enabled, updated, memory)
    memory.copy_(updated)
    return rows if after else None


def dpa_mask(v, value_rows, grad_memory, labels, tau: float, gather: bool):
    """DPA's irrelevant entries (B, C) bool: the sample's class memory says the channel stays below tau
    (value) and its gradient pushes it down (grad), yet the sample responds above tau.

    ``value_rows``: the value memory (K, C) to look up at ``labels`` when ``gather``, else the rows (B, C)
    already looked up. v (B, C); grad_memory (K, C); labels (B,) int64."""
    rows = value_rows[labels] if gather else value_rows
    return (rows < tau) & (v > tau) & (grad_memory[labels] < 0)


def closed_form_ema(memory: torch.Tensor, labels: torch.Tensor, values: torch.Tensor,
                    alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequential rule in closed form. A sample whose values are not all finite is left out: it
    changes no memory. With n_i the number of samples that have updated sample i's class memory by the
    time of sample i (i included when it counts) and d = 1 - alpha, the memory right after sample i is

        after_i = d ** n_i * M[y_i] + alpha * sum over counting samples l <= i of the class of
                  d ** (n_i - n_l) * values_l,

    computed in float64 (a (B, B) weight matrix); for a sample left out that is its class's memory as it
    stands. Each class's new row is the ``after`` of its last sample; classes not in the batch keep theirs.

    Shapes: memory (K, C); labels (B,) int64; values (B, C). Returns after (B, C) and the new memory (K, C),
    both in memory's dtype.
    """
    n, k = labels.shape[0], memory.shape[0]
    if n == 0:
        return memory.new_empty(0, memory.shape[1]), memory.clone()
    wide = torch.float64
    zero = torch.zeros((), dtype=wide, device=memory.device)
    start = memory.index_select(0, labels).to(wide)
    finite = torch.isfinite(values).all(1)
    values = torch.where(finite[:, None], values.to(wide), zero)
    earlier = torch.ones(n, n, dtype=torch.bool, device=labels.device).tril()
    used = (labels[:, None] == labels[None, :]) & earlier & finite[None, :]  # (i, l): l updated i's row by i
    steps = used.sum(1)
    decay = torch.full((), 1.0 - alpha, dtype=wide, device=memory.device)  # a fill, not a host copy (no sync)
    lag = (steps[:, None] - steps[None, :]).clamp_min(0)
    weights = torch.where(used, alpha * decay.pow(lag), zero)
    after = (weights @ values + decay.pow(steps)[:, None] * start).to(memory.dtype)
    member = labels[None, :] == torch.arange(k, device=labels.device)[:, None]  # (K, B)
    last_sample = (member * torch.arange(1, n + 1, device=labels.device)).amax(1).sub(1).clamp_min(0)
    updated = torch.where(member.any(1)[:, None], after.index_select(0, last_sample), memory)
    return after, updated
