"""Triton kernels of the fused operations (CUDA; on CPU tensors through Triton's interpreter).

Each launcher takes and returns what its namesake in ``composite.py`` does, which is the reference it is
tested against. Maps load in their own dtype (float32, bfloat16, float16), compute in float32 and store
in the input's dtype. Reductions are deterministic: each program writes its partial sums to a buffer of
its own, summed afterwards, so no atomics are used and two runs give the same bits.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import composite

_BLOCK = 1024
_TILE = 4096  # elements of a 2D tile


@triton.jit
def _adjusted(rho, e):
    """The adjuster s(rho): rho at or above eta, eta * exp(rho - eta) below (a NaN stays NaN)."""
    return tl.where(rho < e, e * tl.exp(tl.minimum(rho - e, 0.0)), rho)


@triton.jit
def _channel_params(W, NU, ETA, nu_row, cc, live_c):
    """inv_w, nu and eta of channels ``cc``; ``nu_row`` is the offset of the sample's nu row."""
    w = tl.load(W + cc, mask=live_c, other=0.0)
    n = tl.load(NU + nu_row + cc, mask=live_c, other=0.0)
    e = tl.load(ETA + cc, mask=live_c, other=0.0)
    return w, n, e


@triton.jit
def _iieu_planes_fwd(X, INV, W, NU, ETA, OUT, C, CG, G, P, W_AT, NU_AT, BLOCK: tl.constexpr):
    """Program (b * C + c, position block): the unit's output; inv_w (C,) and nu (B, C) start W_AT and
    NU_AT elements into W and NU."""
    W = W + W_AT
    bc = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = offs < P
    c = bc % C
    b = bc // C
    g = c // CG
    x = tl.load(X + bc * P + offs, mask=live, other=0.0).to(tl.float32)
    inv = tl.load(INV + (b * G + g) * P + offs, mask=live, other=0.0)
    w = tl.load(W + c)
    n = tl.load(NU + NU_AT + bc)
    e = tl.load(ETA + c)
    rho = x * (w * inv) + n
    tl.store(OUT + bc * P + offs, (_adjusted(rho, e) * x).to(OUT.dtype.element_ty), mask=live)


@triton.jit
def _grad_terms(x, go, a, n, e):
    """Per element of IIEU-B's backward, with a = inv_w * inv: grad_x, and the terms whose sums give the
    gradients of a (times x), nu and eta (before its (1 - eta) factor)."""
    rho = x * a + n
    below = rho < e
    expo = tl.exp(tl.minimum(rho - e, 0.0))
    s_low = expo * e
    scale = tl.where(below, s_low, rho)
    g_scale = go * x
    g_rho = tl.where(below, g_scale * s_low, g_scale)
    return go * scale + g_rho * a, g_rho * x, g_rho, tl.where(below, g_scale * expo, 0.0)


@triton.jit
def _plane_tile(bg, cb, pb, C, CG, G, P, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The (BLOCK_C, BLOCK_P) tile of program (b * G + g, channel block cb, position block pb): sample b,
    channels c, positions offs, their liveness and the flat offsets of the tile's elements."""
    b = bg // G
    g = bg % G
    offs = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    live_p = offs < P
    local = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    live_c = local < CG
    c = g * CG + local
    live = live_c[:, None] & live_p[None, :]
    at = (b * C + c)[:, None] * P + offs[None, :]
    return b, c, offs, live_p, live_c, live, at


@triton.jit
def _store_tile_sums(GINV_PART, PART, SLAB, bg, slot, offs, live_p, live_c, g_rx, g_rho, g_eta, w, inv, P):
    """A tile's share of the unit's gradient sums: dL/d inv summed over its channels into GINV_PART
    (NCB, B * G, P), and per channel over its positions the sums of g_rx * inv, g_rho and g_eta into
    slabs 0-2 of PART at ``slot``."""
    tl.store(GINV_PART + (tl.program_id(1) * tl.num_programs(0) + bg) * P + offs, tl.sum(g_rx * w[:, None], axis=0),
             mask=live_p)
    tl.store(PART + slot, tl.sum(g_rx * inv[None, :], axis=1), mask=live_c)
    tl.store(PART + SLAB + slot, tl.sum(g_rho, axis=1), mask=live_c)
    tl.store(PART + 2 * SLAB + slot, tl.sum(g_eta, axis=1), mask=live_c)


@triton.jit
def _iieu_planes_bwd(GO, X, INV, W, NU, ETA, GX, GINV_PART, PART, C, CG, G, P, NCB, NPB, SLAB,
                     BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (b * G + g, channel block cb, position block pb) on a (BLOCK_C, BLOCK_P) tile of the group's
    planes: grad_x; grad_inv summed over the tile's channels into GINV_PART (NCB, B * G, P); per-channel
    sums over the tile's positions into PART (3, B * C, NPB). Tiles keep every program short and the grid
    wide, also for deep layers with few positions and many channels."""
    bg = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(2)
    b, c, offs, live_p, live_c, live, at = _plane_tile(bg, tl.program_id(1), pb, C, CG, G, P, BLOCK_C, BLOCK_P)
    inv = tl.load(INV + bg * P + offs, mask=live_p, other=0.0)
    x = tl.load(X + at, mask=live, other=0.0).to(tl.float32)
    go = tl.load(GO + at, mask=live, other=0.0).to(tl.float32)
    w, n, e = _channel_params(W, NU, ETA, b * C, c, live_c)
    grad_x, g_rx, g_rho, g_eta = _grad_terms(x, go, w[:, None] * inv[None, :], n[:, None], e[:, None])
    tl.store(GX + at, grad_x.to(GX.dtype.element_ty), mask=live)
    _store_tile_sums(GINV_PART, PART, SLAB, bg, (b * C + c) * NPB + pb, offs, live_p, live_c, g_rx, g_rho, g_eta, w,
                     inv, P)


@triton.jit
def _iieu_bn_sums(GO, CIN, INV, STATS, ETA, PART, C, CG, G, P, NPB, SLAB, BC, W_AT,
                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Pass 1 of the backward through the BatchNorm, on a tile as ``_iieu_planes_bwd``: x_t = c * xs + xb
    and xhat = c * hs + hb formed from the BatchNorm input c in registers; g is the gradient w.r.t. x_t.
    PART (6, B * C, NPB): the sums over the tile's positions of g_rx * inv, g_rho, g_eta, g, g * xhat and
    xhat (SLAB = B * C * NPB each), followed in the same buffer by GINV_PART as ``_iieu_planes_bwd``'s.
    STATS: the site's statistics (``composite.site_stats_parts``: xs, xb, hs, hb, gap, nu, ..., inv_w at W_AT)."""
    W = STATS + W_AT
    XS = STATS
    XB = STATS + C
    HS = STATS + 2 * C
    HB = STATS + 3 * C
    NU = STATS + 4 * C + BC
    bg = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(2)
    b, c, offs, live_p, live_c, live, at = _plane_tile(bg, tl.program_id(1), pb, C, CG, G, P, BLOCK_C, BLOCK_P)
    inv = tl.load(INV + bg * P + offs, mask=live_p, other=0.0)
    cin = tl.load(CIN + at, mask=live, other=0.0).to(tl.float32)
    go = tl.load(GO + at, mask=live, other=0.0).to(tl.float32)
    w, n, e = _channel_params(W, NU, ETA, b * C, c, live_c)
    xs = tl.load(XS + c, mask=live_c, other=0.0)[:, None]
    xb = tl.load(XB + c, mask=live_c, other=0.0)[:, None]
    hs = tl.load(HS + c, mask=live_c, other=0.0)[:, None]
    hb = tl.load(HB + c, mask=live_c, other=0.0)[:, None]
    g, g_rx, g_rho, g_eta = _grad_terms(cin * xs + xb, go, w[:, None] * inv[None, :], n[:, None], e[:, None])
    xhat = tl.where(live, cin * hs + hb, 0.0)
    slot = (b * C + c) * NPB + pb
    _store_tile_sums(PART + 6 * SLAB, PART, SLAB, bg, slot, offs, live_p, live_c, g_rx, g_rho, g_eta, w, inv, P)
    tl.store(PART + 3 * SLAB + slot, tl.sum(g, axis=1), mask=live_c)
    tl.store(PART + 4 * SLAB + slot, tl.sum(g * xhat, axis=1), mask=live_c)
    tl.store(PART + 5 * SLAB + slot, tl.sum(xhat, axis=1), mask=live_c)


@triton.jit
def _iieu_bn_grad(GO, CIN, INV, STATS, ETA, K1, K1_AT, K2, GC, C, CG, G, P, W_AT, BLOCK: tl.constexpr):
    """Pass 2, program (b * C + c, position block): dL/dc = xs * g + k1 + k2 * c, stored in c's dtype;
    k1 (B, C) starts K1_AT elements into K1's buffer; xs, xb, nu and inv_w (at W_AT) are the site's STATS."""
    W = STATS + W_AT
    XS = STATS
    XB = STATS + C
    NU = STATS + 4 * C + tl.num_programs(0)
    bc = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = offs < P
    c = bc % C
    b = bc // C
    cin = tl.load(CIN + bc * P + offs, mask=live, other=0.0).to(tl.float32)
    go = tl.load(GO + bc * P + offs, mask=live, other=0.0).to(tl.float32)
    inv = tl.load(INV + (b * G + c // CG) * P + offs, mask=live, other=0.0)
    x = cin * tl.load(XS + c) + tl.load(XB + c)
    g = _grad_terms(x, go, tl.load(W + c) * inv, tl.load(NU + bc), tl.load(ETA + c))[0]
    grad = tl.load(XS + c) * g + tl.load(K1 + K1_AT + bc) + tl.load(K2 + c) * cin
    tl.store(GC + bc * P + offs, grad.to(GC.dtype.element_ty), mask=live)


@triton.jit
def _column_sum(X, B, C, cc, live_c, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sums over the B rows of a (B, C) float32 array at columns cc, in (BLOCK_B, BLOCK_C) tiles."""
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        bb = b0 + tl.arange(0, BLOCK_B)
        live = (bb < B)[:, None] & live_c[None, :]
        acc += tl.sum(tl.load(X + bb[:, None] * C + cc[None, :], mask=live, other=0.0), axis=0)
    return acc


@triton.jit
def _bn_terms(TERMS, WEIGHT, BIAS, FILTERS, B, C, P, eps, K, filter_eps, FILTERS_AT, HAS_WEIGHT: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_FILTERS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """Program per channel block. TERMS holds (4, C) coefficients, then the planes' means (B, C), then
    their sums of squared deviations (B, C) (``_plane_moments``); from them the channel's batch mean and
    biased variance, the coefficients xs, xb, hs, hb (x_t = c * xs + xb, xhat = c * hs + hb), and GAP(x_t)
    (B, C) = plane mean * xs + xb, written over the means (each program reads only its channels'). With
    HAS_FILTERS also the inverse norms and squared norms of its channels' producer filters (C rows of K),
    at FILTERS_AT in TERMS' buffer, as ``_rows_inv_norm``."""
    MEAN = TERMS + 4 * C
    GAP = MEAN
    M2 = MEAN + B * C
    cc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    live_c = cc < C
    mean = _column_sum(MEAN, B, C, cc, live_c, BLOCK_B, BLOCK_C) / B
    spread = tl.zeros([BLOCK_C], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        bb = b0 + tl.arange(0, BLOCK_B)
        live = (bb < B)[:, None] & live_c[None, :]
        at = bb[:, None] * C + cc[None, :]
        d = tl.where(live, tl.load(MEAN + at, mask=live, other=0.0) - mean[None, :], 0.0)
        spread += tl.sum(tl.load(M2 + at, mask=live, other=0.0) / P + d * d, axis=0)
    hs = 1.0 / tl.sqrt(spread / B + eps)
    xs = hs
    if HAS_WEIGHT:
        xs = hs * tl.load(WEIGHT + cc, mask=live_c, other=0.0).to(tl.float32)
    xb = -mean * xs
    if HAS_BIAS:
        xb += tl.load(BIAS + cc, mask=live_c, other=0.0).to(tl.float32)
    tl.store(TERMS + cc, xs, mask=live_c)
    tl.store(TERMS + C + cc, xb, mask=live_c)
    tl.store(TERMS + 2 * C + cc, hs, mask=live_c)
    tl.store(TERMS + 3 * C + cc, -mean * hs, mask=live_c)
    for b0 in range(0, B, BLOCK_B):
        bb = b0 + tl.arange(0, BLOCK_B)
        live = (bb < B)[:, None] & live_c[None, :]
        at = bb[:, None] * C + cc[None, :]
        tl.store(GAP + at, tl.load(MEAN + at, mask=live, other=0.0) * xs[None, :] + xb[None, :], mask=live)
    if HAS_FILTERS:
        _filter_norms(FILTERS, TERMS + FILTERS_AT, TERMS + FILTERS_AT + C, cc, live_c, K, filter_eps, BLOCK_C, BLOCK_K)


@triton.jit
def _filter_norms(X, INV, SUMSQ, rows, live_r, K, eps, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / (||x_r|| + eps) and ||x_r||^2 of rows ``rows`` of X (rows of K), in float32."""
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        live = live_r[:, None] & (kk < K)[None, :]
        x = tl.load(X + rows.to(tl.int64)[:, None] * K + kk[None, :], mask=live, other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    tl.store(INV + rows, 1.0 / (tl.sqrt(acc) + eps), mask=live_r)
    tl.store(SUMSQ + rows, acc, mask=live_r)


@triton.jit
def _bn_rows(PART, STATS, LN_W, ROWS, GINV, C, NPB, SLAB, BC, P, NCB, GP, BLOCK_C: tl.constexpr):
    """Program per sample b, after ``_iieu_bn_sums``: its PART sums over the position blocks give dL/d nu
    and the sums of g, g * xhat and xhat per channel; term-B's spread k = dL/d GAP(x_t) / P comes from
    sigmoid's and the LayerNorm's backward over the sample's channels. ROWS (6, B, C): dL/d nu, k, the
    sums of g and g * xhat with k included (sum g + P k, sum g * xhat + k sum xhat), and the sample's
    shares of dL/d inv_w and of dL/d eta (before its (1 - eta) factor); with term-B, rows 6 and 7 hold
    dL/dz = dL/d nu * nu (1 - nu) and dL/dz * the normalised gap, whose sums over the batch are the
    LayerNorm's bias and weight gradients. GINV (B, G * P):
    dL/d inv, the sum of the NCB channel blocks' partial sums GINV_PART (NCB, B, G * P), which follow
    PART in its buffer. gap, nu and the LayerNorm's mean and rstd are the site's STATS."""
    b = tl.program_id(0).to(tl.int64)
    GINV_PART = PART + 6 * SLAB
    GAP = STATS + 4 * C
    NU = GAP + BC
    LN_MEAN = NU + BC
    LN_RSTD = LN_MEAN + tl.num_programs(0)
    for i0 in range(0, GP, BLOCK_C):
        ii = i0 + tl.arange(0, BLOCK_C)
        live = ii < GP
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for k in range(0, NCB):
            acc += tl.load(GINV_PART + (k * tl.num_programs(0) + b) * GP + ii, mask=live, other=0.0)
        tl.store(GINV + b * GP + ii, acc, mask=live)
    acc_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        live = cc < C
        at = (b * C + cc) * NPB
        g_nu = tl.zeros([BLOCK_C], dtype=tl.float32)
        s_g = tl.zeros([BLOCK_C], dtype=tl.float32)
        s_gh = tl.zeros([BLOCK_C], dtype=tl.float32)
        s_h = tl.zeros([BLOCK_C], dtype=tl.float32)
        g_w = tl.zeros([BLOCK_C], dtype=tl.float32)
        g_eta = tl.zeros([BLOCK_C], dtype=tl.float32)
        for k in range(0, NPB):
            g_w += tl.load(PART + at + k, mask=live, other=0.0)
            g_eta += tl.load(PART + 2 * SLAB + at + k, mask=live, other=0.0)
            g_nu += tl.load(PART + SLAB + at + k, mask=live, other=0.0)
            s_g += tl.load(PART + 3 * SLAB + at + k, mask=live, other=0.0)
            s_gh += tl.load(PART + 4 * SLAB + at + k, mask=live, other=0.0)
            s_h += tl.load(PART + 5 * SLAB + at + k, mask=live, other=0.0)
        row = b * C + cc
        tl.store(ROWS + row, g_nu, mask=live)
        tl.store(ROWS + BC + row, s_h, mask=live)  # until the second sweep puts k here
        tl.store(ROWS + 2 * BC + row, s_g, mask=live)
        tl.store(ROWS + 3 * BC + row, s_gh, mask=live)
        tl.store(ROWS + 4 * BC + row, g_w, mask=live)
        tl.store(ROWS + 5 * BC + row, g_eta, mask=live)
        nu = tl.load(NU + row, mask=live, other=0.0)
        gz = g_nu * nu * (1.0 - nu) * tl.load(LN_W + cc, mask=live, other=0.0)
        x_ln = (tl.load(GAP + row, mask=live, other=0.0) - tl.load(LN_MEAN + b)) * tl.load(LN_RSTD + b)
        tl.store(ROWS + 6 * BC + row, g_nu * nu * (1.0 - nu), mask=live)
        tl.store(ROWS + 7 * BC + row, g_nu * nu * (1.0 - nu) * x_ln, mask=live)
        acc_a += gz
        acc_b += gz * x_ln
    mean_a = tl.sum(acc_a, axis=0) / C
    mean_b = tl.sum(acc_b, axis=0) / C
    rstd = tl.load(LN_RSTD + b)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        live = cc < C
        row = b * C + cc
        nu = tl.load(NU + row, mask=live, other=0.0)
        gz = tl.load(ROWS + row, mask=live, other=0.0) * nu * (1.0 - nu) * tl.load(LN_W + cc, mask=live, other=0.0)
        x_ln = (tl.load(GAP + row, mask=live, other=0.0) - tl.load(LN_MEAN + b)) * rstd
        spread = rstd * (gz - mean_a - x_ln * mean_b) / P
        s_h = tl.load(ROWS + BC + row, mask=live, other=0.0)
        tl.store(ROWS + BC + row, spread, mask=live)
        tl.store(ROWS + 2 * BC + row, tl.load(ROWS + 2 * BC + row, mask=live, other=0.0) + P * spread, mask=live)
        tl.store(ROWS + 3 * BC + row, tl.load(ROWS + 3 * BC + row, mask=live, other=0.0) + spread * s_h, mask=live)


@triton.jit
def _bn_channels(ROWS, STATS, ETA, CH, B, C, BC, N, BATCH_STATS: tl.constexpr, BLOCK_B: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """Program per channel block, after ``_bn_rows``: CH (7, C) = dL/d inv_w, dL/d eta, dL/d gamma,
    dL/d beta, k2 and the LayerNorm's dL/d weight and dL/d bias; K1 (B, C) = k1
    (dL/dc = xs * g + k1 + k2 * c) follows ROWS (8, B, C) in its buffer. xs, hs and hb: the site's STATS."""
    K1 = ROWS + 8 * BC
    XS = STATS
    HS = STATS + 2 * C
    HB = STATS + 3 * C
    cc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    live_c = cc < C
    g_beta = _column_sum(ROWS + 2 * BC, B, C, cc, live_c, BLOCK_B, BLOCK_C)
    g_gamma = _column_sum(ROWS + 3 * BC, B, C, cc, live_c, BLOCK_B, BLOCK_C)
    xs = tl.load(XS + cc, mask=live_c, other=0.0)
    base = tl.zeros([BLOCK_C], dtype=tl.float32)
    k2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    if BATCH_STATS:
        base = (g_beta + g_gamma * tl.load(HB + cc, mask=live_c, other=0.0)) / N
        k2 = -xs * g_gamma * tl.load(HS + cc, mask=live_c, other=0.0) / N
    for b0 in range(0, B, BLOCK_B):
        bb = b0 + tl.arange(0, BLOCK_B)
        live = (bb < B)[:, None] & live_c[None, :]
        at = bb[:, None] * C + cc[None, :]
        spread = tl.load(ROWS + BC + at, mask=live, other=0.0)
        tl.store(K1 + at, xs[None, :] * (spread - base[None, :]), mask=live)
    g_eta = _column_sum(ROWS + 5 * BC, B, C, cc, live_c, BLOCK_B, BLOCK_C)
    tl.store(CH + cc, _column_sum(ROWS + 4 * BC, B, C, cc, live_c, BLOCK_B, BLOCK_C), mask=live_c)
    tl.store(CH + C + cc, g_eta * (1.0 - tl.load(ETA + cc, mask=live_c, other=0.0)), mask=live_c)
    tl.store(CH + 2 * C + cc, g_gamma, mask=live_c)
    tl.store(CH + 3 * C + cc, g_beta, mask=live_c)
    tl.store(CH + 4 * C + cc, k2, mask=live_c)
    tl.store(CH + 5 * C + cc, _column_sum(ROWS + 7 * BC, B, C, cc, live_c, BLOCK_B, BLOCK_C), mask=live_c)
    tl.store(CH + 6 * C + cc, _column_sum(ROWS + 6 * BC, B, C, cc, live_c, BLOCK_B, BLOCK_C), mask=live_c)


@triton.jit
def _term_b(GAP, WEIGHT, BIAS, NU, MEAN, RSTD, C, eps, SITE: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program per sample: ``_term_b_row``. SITE: GAP is a site's statistics, where gap, nu, mean and rstd
    have their places (``composite.site_stats_parts``)."""
    b = tl.program_id(0).to(tl.int64)
    if SITE:
        GAP = GAP + 4 * C
        NU = GAP + tl.num_programs(0) * C
        MEAN = NU + tl.num_programs(0) * C
        RSTD = MEAN + tl.num_programs(0)
    _term_b_row(GAP, WEIGHT, BIAS, NU, MEAN, RSTD, b, C, eps, BLOCK_C)


@triton.jit
def _term_b_row(GAP, WEIGHT, BIAS, NU, MEAN, RSTD, b, C, eps, BLOCK_C: tl.constexpr):
    """Sample b's nu = sigmoid(LayerNorm(gap) * weight + bias) over its C channels (rows of C in GAP and
    NU), and the LayerNorm's mean and rstd (biased variance, as LayerNorm)."""
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        acc += tl.load(GAP + b * C + cc, mask=cc < C, other=0.0)
    mean = tl.sum(acc, axis=0) / C
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        d = tl.where(cc < C, tl.load(GAP + b * C + cc, mask=cc < C, other=0.0) - mean, 0.0)
        acc += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / C + eps)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        live = cc < C
        z = (tl.load(GAP + b * C + cc, mask=live, other=0.0) - mean) * rstd
        z = z * tl.load(WEIGHT + cc, mask=live, other=0.0) + tl.load(BIAS + cc, mask=live, other=0.0)
        tl.store(NU + b * C + cc, tl.sigmoid(z), mask=live)
    tl.store(MEAN + b, mean)
    tl.store(RSTD + b, rstd)


@triton.jit
def _plane_moments(X, MOMENTS, AT, P, BLOCK: tl.constexpr):
    """Program per (b, c) plane, one pass over it in its own dtype: the float32 mean and sum of squared
    deviations, accumulated about the plane's first value (a map far from zero keeps its variance), into
    MOMENTS (2, B, C), AT elements into its buffer."""
    bc = tl.program_id(0).to(tl.int64)
    k = tl.load(X + bc * P).to(tl.float32)
    s1 = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = tl.zeros([BLOCK], dtype=tl.float32)
    for p0 in range(0, P, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        live = offs < P
        d = tl.where(live, tl.load(X + bc * P + offs, mask=live, other=0.0).to(tl.float32) - k, 0.0)
        s1 += d
        s2 += d * d
    t1 = tl.sum(s1, axis=0)
    tl.store(MOMENTS + AT + bc, k + t1 / P)
    tl.store(MOMENTS + AT + tl.num_programs(0) + bc, tl.sum(s2, axis=0) - t1 * t1 / P)


@triton.jit
def _finish_sums(PART, ETA, GNU, GW, GETA, S, NK, C, SLAB, STRIDE_S, STRIDE_K, STRIDE_C,
                 BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """After a backward launch that left per-block partial sums PART (3 slabs: g_rx * inv, g_rho, g_eta)
    with element (sample s, block k, channel c) at s * STRIDE_S + k * STRIDE_K + c * STRIDE_C: program per
    channel block writes dL/d nu (S, C) = the sums over k of slab 1, dL/d inv_w (C,) and dL/d eta (C,)
    (times 1 - eta) = the sums over s and k of slabs 0 and 2."""
    cc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    live_c = cc < C
    g_w = tl.zeros([BLOCK_C], dtype=tl.float32)
    g_eta = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        live = (ss < S)[:, None] & live_c[None, :]
        base = ss[:, None].to(tl.int64) * STRIDE_S + cc[None, :] * STRIDE_C
        acc_w = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        acc_nu = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        acc_eta = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        for k in range(0, NK):
            at = base + k * STRIDE_K
            acc_w += tl.load(PART + at, mask=live, other=0.0)
            acc_nu += tl.load(PART + SLAB + at, mask=live, other=0.0)
            acc_eta += tl.load(PART + 2 * SLAB + at, mask=live, other=0.0)
        tl.store(GNU + ss[:, None] * C + cc[None, :], acc_nu, mask=live)
        g_w += tl.sum(acc_w, axis=0)
        g_eta += tl.sum(acc_eta, axis=0)
    tl.store(GW + cc, g_w, mask=live_c)
    tl.store(GETA + cc, g_eta * (1.0 - tl.load(ETA + cc, mask=live_c, other=0.0)), mask=live_c)


@triton.jit
def _iieu_rows_fwd(X, INV, W, NU, ETA, OUT, C, T, INV_AT, W_AT, NU_AT, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (sample s, token block): rows s * T + t, all channels in chunks; inv, inv_w and nu start
    INV_AT, W_AT and NU_AT elements into their buffers."""
    INV = INV + INV_AT
    W = W + W_AT
    NU = NU + NU_AT
    s = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    live_t = t < T
    rows = s * T + t
    inv = tl.load(INV + rows, mask=live_t, other=0.0)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        live_c = cc < C
        live = live_t[:, None] & live_c[None, :]
        at = rows[:, None] * C + cc[None, :]
        x = tl.load(X + at, mask=live, other=0.0).to(tl.float32)
        w, n, e = _channel_params(W, NU, ETA, s * C, cc, live_c)
        rho = x * (w[None, :] * inv[:, None]) + n[None, :]
        tl.store(OUT + at, (_adjusted(rho, e[None, :]) * x).to(OUT.dtype.element_ty), mask=live)


@triton.jit
def _iieu_rows_bwd(GO, X, INV, W, NU, ETA, GX, GINV, PART, C, T, NTB, SLAB, INV_AT, W_AT, NU_AT, GINV_AT,
                   BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (sample s, token block tb): grad_inv of its rows summed here over all channels;
    per-channel sums over its rows written to PART (3, S * NTB, C). inv, inv_w, nu and grad_inv start
    INV_AT, W_AT, NU_AT and GINV_AT elements into their buffers."""
    INV = INV + INV_AT
    W = W + W_AT
    NU = NU + NU_AT
    GINV = GINV + GINV_AT
    s = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    live_t = t < T
    rows = s * T + t
    inv = tl.load(INV + rows, mask=live_t, other=0.0)
    acc_inv = tl.zeros([BLOCK_T], dtype=tl.float32)
    part_row = (s * NTB + tb) * C
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        live_c = cc < C
        live = live_t[:, None] & live_c[None, :]
        at = rows[:, None] * C + cc[None, :]
        x = tl.load(X + at, mask=live, other=0.0).to(tl.float32)
        go = tl.load(GO + at, mask=live, other=0.0).to(tl.float32)
        w, n, e = _channel_params(W, NU, ETA, s * C, cc, live_c)
        w, n, e = w[None, :], n[None, :], e[None, :]
        grad_x, g_rx, g_rho, g_eta = _grad_terms(x, go, w * inv[:, None], n, e)
        tl.store(GX + at, grad_x.to(GX.dtype.element_ty), mask=live)
        acc_inv += tl.sum(g_rx * w, axis=1)
        tl.store(PART + part_row + cc, tl.sum(g_rx * inv[:, None], axis=0), mask=live_c)
        tl.store(PART + SLAB + part_row + cc, tl.sum(g_rho, axis=0), mask=live_c)
        tl.store(PART + 2 * SLAB + part_row + cc, tl.sum(g_eta, axis=0), mask=live_c)
    tl.store(GINV + rows, acc_inv, mask=live_t)


@triton.jit
def _channel_sumsq(X, OUT, INV, CG, P, eps, silent, WITH_INV: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_P: tl.constexpr):
    """Program (b * G + g, position block): sum of squares over the group's CG channels, in float32, and
    with WITH_INV its inverse norm (0 below ``silent``)."""
    bg = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    live_p = offs < P
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, CG, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        live = (cc < CG)[:, None] & live_p[None, :]
        x = tl.load(X + (bg * CG + cc)[:, None] * P + offs[None, :], mask=live, other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=0)
    tl.store(OUT + bg * P + offs, acc.to(OUT.dtype.element_ty), mask=live_p)
    if WITH_INV:
        norm = tl.sqrt(acc)
        tl.store(INV + bg * P + offs, tl.where(norm < silent, 0.0, 1.0 / (norm + eps)), mask=live_p)


@triton.jit
def _channel_scale(X, S, GINV, ADD, OUT, CG, P, eps, silent, HAS_ADD: tl.constexpr, FROM_NORMS: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Program (b * C + c, position block): x times its group's scale, plus ``ADD`` (x's shape) when
    HAS_ADD, stored in the output's dtype (OUT may be ADD itself: each element is read before written).
    FROM_NORMS: S holds squared norms and GINV dL/d of their inverses; the scale is 2 * dL/d sumsq."""
    bc = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = offs < P
    x = tl.load(X + bc * P + offs, mask=live, other=0.0).to(tl.float32)
    s = tl.load(S + (bc // CG) * P + offs, mask=live, other=0.0).to(tl.float32)
    if FROM_NORMS:
        g = tl.load(GINV + (bc // CG) * P + offs, mask=live, other=0.0)
        norm = tl.sqrt(s)
        inv = 1.0 / (norm + eps)
        on = (norm > 0) & (norm >= silent)
        s = tl.where(on, -g * inv * inv / tl.where(on, norm, 1.0), 0.0)
    y = x * s
    if HAS_ADD:
        y += tl.load(ADD + bc * P + offs, mask=live, other=0.0).to(tl.float32)
    tl.store(OUT + bc * P + offs, y.to(OUT.dtype.element_ty), mask=live)


@triton.jit
def _inverse_norm(S, INV, n, eps, silent, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    norm = tl.sqrt(tl.load(S + offs, mask=live, other=1.0))
    inv = tl.where(norm < silent, 0.0, 1.0 / (norm + eps))
    tl.store(INV + offs, inv, mask=live)


@triton.jit
def _inv_norm_grad(S, GINV, GS, n, eps, silent, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    norm = tl.sqrt(tl.load(S + offs, mask=live, other=1.0))
    g = tl.load(GINV + offs, mask=live, other=0.0)
    inv = 1.0 / (norm + eps)
    on = (norm > 0) & (norm >= silent)
    safe = tl.where(on, norm, 1.0)
    tl.store(GS + offs, tl.where(on, -g * inv * inv / (2 * safe), 0.0), mask=live)


@triton.jit
def _window_inv_norm(SQ, INV, SUMSQ, H, W, OH, OW, SH, SW, DH, DW, TOP, LEFT, eps, silent, KH: tl.constexpr,
                     KW: tl.constexpr, BLOCK: tl.constexpr):
    """Program (b * G + g, output block): each output position's sum of ``SQ`` over its receptive field
    (zero padding), and its inverse norm."""
    bg = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = offs < OH * OW
    oh = offs // OW
    ow = offs % OW
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(KH):
        h = oh * SH - TOP + i * DH
        for j in tl.static_range(KW):
            w = ow * SW - LEFT + j * DW
            inside = live & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            acc += tl.load(SQ + bg * H * W + h * W + w, mask=inside, other=0.0)
    norm = tl.sqrt(acc)
    tl.store(INV + bg * OH * OW + offs, tl.where(norm < silent, 0.0, 1.0 / (norm + eps)), mask=live)
    tl.store(SUMSQ + bg * OH * OW + offs, acc, mask=live)


@triton.jit
def _window_inv_norm_bwd(SUMSQ, GINV, FACTOR, H, W, OH, OW, SH, SW, DH, DW, TOP, LEFT, eps, silent,
                         KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr):
    """Program (b * G + g, input block): f = 2 * the sum of dL/d sumsq over the output positions whose
    receptive field holds the input position (the window sum's adjoint), dL/d sumsq formed on the fly."""
    bg = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = offs < H * W
    h = offs // W
    w = offs % W
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(KH):
        th = h + TOP - i * DH
        oh = th // SH
        row_ok = live & (th >= 0) & (th % SH == 0) & (oh < OH)
        for j in tl.static_range(KW):
            tw = w + LEFT - j * DW
            ow = tw // SW
            ok = row_ok & (tw >= 0) & (tw % SW == 0) & (ow < OW)
            at = bg * OH * OW + oh * OW + ow
            norm = tl.sqrt(tl.load(SUMSQ + at, mask=ok, other=1.0))
            g = tl.load(GINV + at, mask=ok, other=0.0)
            inv = 1.0 / (norm + eps)
            on = ok & (norm > 0) & (norm >= silent)
            acc += tl.where(on, -g * inv * inv / (2 * tl.where(on, norm, 1.0)), 0.0)
    tl.store(FACTOR + bg * H * W + offs, 2 * acc, mask=live)


@triton.jit
def _rows_inv_norm(X, INV, SUMSQ, R, K, eps, silent, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    live_r = rows < R
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        live = live_r[:, None] & (kk < K)[None, :]
        x = tl.load(X + rows[:, None] * K + kk[None, :], mask=live, other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    norm = tl.sqrt(acc)
    inv = 1.0 / (norm + eps)
    inv = tl.where((silent >= 0) & (norm < silent), 0.0, inv)
    tl.store(INV + rows, inv, mask=live_r)
    tl.store(SUMSQ + rows, acc, mask=live_r)


@triton.jit
def _rows_inv_norm_bwd(X, SUMSQ, GINV, ADD, GX, R, K, eps, silent, SUMSQ_AT, GINV_AT, SPREAD_AT, T,
                       HAS_ADD: tl.constexpr, HAS_SPREAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """dL/d x of the rows' inverse norms, plus ``ADD`` (x's shape) when HAS_ADD (GX may be ADD itself); the
    squared norms start SUMSQ_AT elements into SUMSQ, dL/d inv GINV_AT into GINV. HAS_SPREAD: plus a
    per-sample row (S, K) at SPREAD_AT in SUMSQ's buffer, at each of the sample's T rows."""
    SPREAD = SUMSQ + SPREAD_AT
    SUMSQ = SUMSQ + SUMSQ_AT
    GINV = GINV + GINV_AT
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    live_r = rows < R
    sumsq = tl.load(SUMSQ + rows, mask=live_r, other=0.0)
    g_inv = tl.load(GINV + rows, mask=live_r, other=0.0)
    norm = tl.sqrt(sumsq)
    inv = 1.0 / (norm + eps)
    live_norm = (norm > 0) & ~((silent >= 0) & (norm < silent))
    safe = tl.where(live_norm, norm, 1.0)
    g_sumsq = tl.where(live_norm, -g_inv * inv * inv / (2 * safe), 0.0)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        live = live_r[:, None] & (kk < K)[None, :]
        at = rows[:, None] * K + kk[None, :]
        x = tl.load(X + at, mask=live, other=0.0).to(tl.float32)
        grad = 2 * x * g_sumsq[:, None]
        if HAS_SPREAD:
            grad += tl.load(SPREAD + (rows // T)[:, None] * K + kk[None, :], mask=live, other=0.0)
        if HAS_ADD:
            grad += tl.load(ADD + at, mask=live, other=0.0).to(tl.float32)
        tl.store(GX + at, grad.to(GX.dtype.element_ty), mask=live)


@triton.jit
def _tau_pool_maps(X, OUT, V, P, tau, BLOCK: tl.constexpr):
    """Program per (b, c) plane: TAU over its P positions and their float32 mean."""
    bc = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for p0 in range(0, P, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        live = offs < P
        x = tl.load(X + bc * P + offs, mask=live, other=0.0)
        tl.store(OUT + bc * P + offs, tl.where(x < tau, 0.0, x).to(OUT.dtype.element_ty), mask=live)
        acc += x.to(tl.float32)
    tl.store(V + bc, tl.sum(acc, axis=0) / P)


@triton.jit
def _tau_pool_tokens(X, OUT, V, N, C, tau, BLOCK_C: tl.constexpr):
    """Program (sample b, channel block): TAU over its N tokens and their float32 mean."""
    b = tl.program_id(0).to(tl.int64)
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    live = cc < C
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n in range(0, N):
        at = (b * N + n) * C + cc
        x = tl.load(X + at, mask=live, other=0.0)
        tl.store(OUT + at, tl.where(x < tau, 0.0, x).to(OUT.dtype.element_ty), mask=live)
        acc += x.to(tl.float32)
    tl.store(V + b * C + cc, acc / N, mask=live)


@triton.jit
def _pack_passes(X, PASSES, numel, tau, BLOCK_BYTES: tl.constexpr):
    """Byte i holds the flags x >= tau of elements 8i .. 8i + 7 (flag t in bit t)."""
    byte = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    bit = tl.arange(0, 8)
    at = byte[:, None] * 8 + bit[None, :]
    live = at < numel
    x = tl.load(X + at, mask=live, other=0.0)
    flags = ((x >= tau) & live).to(tl.int32) << bit[None, :]
    tl.store(PASSES + byte, tl.sum(flags, axis=1).to(tl.uint8), mask=byte * 8 < numel)


@triton.jit
def _tau_pool_bwd(GO, PASSES, GV, GX, numel, P, N, C, gv_row, TOKENS: tl.constexpr, CLS: tl.constexpr,
                  HAS_GV: tl.constexpr, BLOCK: tl.constexpr):
    """grad_out where the pass bit is set, plus grad_v (rows ``gv_row`` apart) spread over the pooled axis
    (with CLS: added to token 0)."""
    at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = at < numel
    go = tl.load(GO + at, mask=live, other=0.0)
    passes = (tl.load(PASSES + at // 8, mask=live, other=0).to(tl.int32) >> (at % 8).to(tl.int32)) & 1
    grad = tl.where(passes != 0, go, 0.0).to(tl.float32)
    if HAS_GV:
        if CLS:
            first = live & ((at // C) % N == 0)
            spread = tl.load(GV + (at // (N * C)) * gv_row + at % C, mask=first, other=0.0)
        elif TOKENS:
            spread = tl.load(GV + (at // (N * C)) * gv_row + at % C, mask=live, other=0.0) / N
        else:
            bc = at // P
            spread = tl.load(GV + (bc // C) * gv_row + bc % C, mask=live, other=0.0) / P
        grad = grad + spread
    tl.store(GX + at, grad.to(GX.dtype.element_ty), mask=live)


@triton.jit
def _dpa_mask(V, VSRC, GMEM, Y, MASK, C, tau, GATHER: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (sample b, channel block): the mask of ``composite.dpa_mask`` in one pass."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    live = c < C
    label = tl.load(Y + b)
    row = label if GATHER else b
    value = tl.load(VSRC + row * C + c, mask=live, other=0.0)
    grad = tl.load(GMEM + label * C + c, mask=live, other=0.0)
    v = tl.load(V + b * C + c, mask=live, other=0.0)
    tl.store(MASK + b * C + c, (value < tau) & (v > tau) & (grad < 0), mask=live)


@triton.jit
def _dpa_entries(v, bc, live, C, VMEM, GMEM, Y, MASK, COUNT, count, first, tau, HAS_MASK: tl.constexpr,
                 HAS_COUNT: tl.constexpr):
    """The end of a DPA forward program: DPA's mask of entries ``bc`` (flat b * C + c, pooled values v)
    from the memories' rows at the labels, and, in the program with ``first`` set, the schedule count."""
    if HAS_MASK:
        label = tl.load(Y + bc // C, mask=live, other=0)
        at = label * C + bc % C
        value = tl.load(VMEM + at, mask=live, other=0.0)
        grad = tl.load(GMEM + at, mask=live, other=0.0)
        tl.store(MASK + bc, (value < tau) & (v > tau) & (grad < 0), mask=live)
    if HAS_COUNT:
        if first:
            tl.store(COUNT, count)


@triton.jit
def _dpa_planes(X, OUT, V, PASSES, VMEM, GMEM, Y, MASK, COUNT, count, P, C, planes, tau, HAS_MASK: tl.constexpr,
                HAS_COUNT: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    """Program per 8 consecutive (b, c) planes, whose 8 P elements fill P whole bytes of the packed pass
    mask: TAU over them, their bits, the 8 planes' float32 means, and ``_dpa_entries``."""
    g = tl.program_id(0).to(tl.int64)
    start = g * 8 * P
    numel = planes * P
    byte = tl.arange(0, BLOCK_BYTES)
    bit = tl.arange(0, 8)
    k = tl.arange(0, 8)
    acc = tl.zeros([8], dtype=tl.float32)
    for b0 in range(0, P, BLOCK_BYTES):
        own = b0 + byte  # byte index within the group
        at = start + own[:, None] * 8 + bit[None, :]
        live = (own < P)[:, None] & (at < numel)
        x = tl.load(X + at, mask=live, other=0.0)
        tl.store(OUT + at, tl.where(x < tau, 0.0, x).to(OUT.dtype.element_ty), mask=live)
        flags = ((x >= tau) & live).to(tl.int32) << bit[None, :]
        tl.store(PASSES + g * P + own, tl.sum(flags, axis=1).to(tl.uint8), mask=(own < P) & (start + own * 8 < numel))
        plane = ((at - start) // P).to(tl.int32)
        hit = plane[:, :, None] == k[None, None, :]
        acc += tl.sum(tl.sum(tl.where(hit, x.to(tl.float32)[:, :, None], 0.0), axis=0), axis=0)
    bc = g * 8 + k
    live_k = bc < planes
    v = acc / P
    tl.store(V + bc, v, mask=live_k)
    _dpa_entries(v, bc, live_k, C, VMEM, GMEM, Y, MASK, COUNT, count, g == 0, tau, HAS_MASK, HAS_COUNT)


@triton.jit
def _dpa_tokens(X, OUT, V, PASSES, VMEM, GMEM, Y, MASK, COUNT, count, N, C, tau, CLS: tl.constexpr,
                HAS_MASK: tl.constexpr, HAS_COUNT: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (sample b, BLOCK_C channels; C and BLOCK_C multiples of 8, so the block's flags of a token
    are whole bytes): TAU over its N tokens, their bits, the float32 means (with CLS: token 0's values)
    and ``_dpa_entries``."""
    b = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * BLOCK_C
    bit = tl.arange(0, 8)
    own = tl.arange(0, BLOCK_C // 8)
    cc = c0 + own[:, None] * 8 + bit[None, :]
    live = cc < C
    acc = tl.zeros([BLOCK_C // 8, 8], dtype=tl.float32)
    for n in range(0, N):
        row = (b * N + n) * C
        x = tl.load(X + row + cc, mask=live, other=0.0)
        tl.store(OUT + row + cc, tl.where(x < tau, 0.0, x).to(OUT.dtype.element_ty), mask=live)
        flags = ((x >= tau) & live).to(tl.int32) << bit[None, :]
        tl.store(PASSES + (row + c0) // 8 + own, tl.sum(flags, axis=1).to(tl.uint8), mask=c0 + own * 8 < C)
        if CLS:
            acc += tl.where(n == 0, x.to(tl.float32), 0.0)
        else:
            acc += x.to(tl.float32)
    v = acc if CLS else acc / N
    tl.store(V + b * C + cc, v, mask=live)
    _dpa_entries(v, b * C + cc, live, C, VMEM, GMEM, Y, MASK, COUNT, count, (b == 0) & (tl.program_id(1) == 0), tau,
                 HAS_MASK, HAS_COUNT)


@triton.jit
def _affine_then(a1, b1, f1, a2, b2, f2):
    """Composition of m -> a1 m + b1 then m -> a2 m + b2, restarted where f2 (a class's first sample)."""
    return tl.where(f2, a2, a1 * a2), tl.where(f2, b2, b1 * a2 + b2), f1 | f2


@triton.jit
def _ema_scan(MEM, VAL, ORDER, YS, AFTER, ENABLED, B, C, alpha, SIGNS: tl.constexpr, HAS_AFTER: tl.constexpr,
              HAS_ENABLED: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program per BLOCK_C channels: DPA's sequential memory rule. Taken in class order (ORDER, YS: the
    stable sort of the labels), each sample is the map m -> (1 - alpha) m + alpha v (the identity for a
    sample with a non-finite value in any channel), and a scan composes them within each class: the memory
    after sample j is the composition up to j applied to its class's row. The last sample of a class
    writes the row. With HAS_ENABLED, a 0-dim flag on the device: where it is false, nothing is read but
    the rows at the labels, nothing is written but AFTER (those rows)."""
    j = tl.arange(0, BLOCK_B)
    on = (tl.load(ENABLED + j * 0) != 0) if HAS_ENABLED else j >= 0
    live_j = j < B
    src = tl.load(ORDER + j, mask=live_j, other=0)
    y = tl.load(YS + j, mask=live_j, other=-1)
    first = y != tl.load(YS + j - 1, mask=live_j & (j > 0), other=-1)
    last = live_j & (y != tl.load(YS + j + 1, mask=j + 1 < B, other=-1))
    bad = tl.zeros([BLOCK_B], dtype=tl.int32)
    scanned = C * tl.max(on.to(tl.int32), axis=0)  # 0 when disabled: no pass over the values
    for c0 in range(0, scanned, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        v = tl.load(VAL + src[:, None] * C + cc[None, :], mask=live_j[:, None] & (cc < C)[None, :], other=0.0)
        bad += tl.sum((~(tl.abs(v) <= 3.4028234663852886e38)).to(tl.int32), axis=1)  # NaN or inf
    cc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    tile = live_j[:, None] & (cc < C)[None, :]
    v = tl.load(VAL + src[:, None] * C + cc[None, :], mask=tile, other=0.0).to(tl.float32)
    if SIGNS:
        v = tl.where(v > 0, 1.0, -1.0)
    use = tile & ((bad == 0) & on)[:, None]
    scale = tl.where(use, 1.0 - alpha, 1.0)
    shift = tl.where(use, alpha * v, 0.0)
    starts = first[:, None] & tile
    scale, shift, _ = tl.associative_scan((scale, shift, starts), 0, _affine_then)
    at = y[:, None] * C + cc[None, :]
    after = scale * tl.load(MEM + at, mask=tile, other=0.0) + shift
    if HAS_AFTER:
        tl.store(AFTER + src[:, None] * C + cc[None, :], after, mask=tile)
    tl.store(MEM + at, after, mask=tile & (last & on)[:, None])


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _column_tiles(b: int, c: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_C) of the per-channel kernels over (B, C) arrays: narrow channel blocks (many
    programs), the batch in few tiles."""
    block_b = _pow2(b, 1, 128)
    return block_b, _pow2(c, 1, max(1, 2048 // block_b))


def _planes_tiles(p: int, cg: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P) of the tiled planes kernels for P positions and CG channels a group."""
    block_p = _pow2(p, 16, 256)
    return _pow2(cg, 1, max(1, _TILE // block_p)), block_p


def _rows_tiles(t: int, c: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_C) of the rows kernels for T tokens a sample and C channels: up to 128 tokens (a ViT's
    sample) in one tile, so that a backward's per-channel partial sums are one row per sample; longer
    samples in tiles of 32 tokens by 128 channels."""
    block_t = _pow2(t, 1, 128) if t <= 128 else 32
    return block_t, _pow2(c, 16, max(16, min(128, _TILE // block_t)))


def _planes_shape(x) -> tuple[int, int, int]:
    """(B, C, P) of a planes tensor (B, C, *S), P = prod(S): the kernels read it through its pointer."""
    return x.shape[0], x.shape[1], math.prod(x.shape[2:])


def iieu_forward(x, inv, inv_w, nu, eta):
    out = torch.empty_like(x)
    if x.dim() != 2:
        b, c, p = _planes_shape(x)
        g = inv.shape[1]
        block = _pow2(p, 16, _BLOCK)
        _iieu_planes_fwd[(b * c, triton.cdiv(p, block))](x, inv, inv_w, nu, eta, out, c, c // g, g, p, 0, 0,
                                                         BLOCK=block)
    else:
        r, c = x.shape
        s = nu.shape[0]
        t = r // s
        block_t, block_c = _rows_tiles(t, c)
        _iieu_rows_fwd[(s, triton.cdiv(t, block_t))](x, inv, inv_w, nu, eta, out, c, t, 0, 0, 0, BLOCK_T=block_t,
                                                      BLOCK_C=block_c)
    return out


def iieu_backward(grad_out, x, inv, inv_w, nu, eta):
    grad_x = torch.empty_like(x)
    grad_inv = torch.empty_like(inv)
    if x.dim() != 2:
        b, c, p = _planes_shape(x)
        g = inv.shape[1]
        cg = c // g
        block_c, block_p = _planes_tiles(p, cg)
        ncb, npb = triton.cdiv(cg, block_c), triton.cdiv(p, block_p)
        part = inv.new_empty(3, b * c, npb)
        ginv_part = grad_inv if ncb == 1 else inv.new_empty(ncb, b * g, p)
        _iieu_planes_bwd[(b * g, ncb, npb)](grad_out, x, inv, inv_w, nu, eta, grad_x, ginv_part, part, c, cg, g, p,
                                            ncb, npb, b * c * npb, BLOCK_C=block_c, BLOCK_P=block_p)
        if ncb > 1:
            torch.sum(ginv_part, 0, out=grad_inv.view(b * g, p))
        grad_w, grad_nu, grad_eta = _finish(part, eta, b, npb, c, (c * npb, 1, npb))
    else:
        r, c = x.shape
        s = nu.shape[0]
        t = r // s
        block_t, block_c = _rows_tiles(t, c)
        ntb = triton.cdiv(t, block_t)
        part = inv.new_empty(3, s * ntb, c)
        _iieu_rows_bwd[(s, ntb)](grad_out, x, inv, inv_w, nu, eta, grad_x, grad_inv, part, c, t, ntb, s * ntb * c,
                                 0, 0, 0, 0, BLOCK_T=block_t, BLOCK_C=block_c)
        grad_w, grad_nu, grad_eta = _finish(part, eta, s, ntb, c, (ntb * c, c, 1))
    return grad_x, grad_inv, grad_w, grad_nu, grad_eta


def _finish(part, eta, samples: int, blocks: int, c: int, strides: tuple):
    """dL/d inv_w, dL/d nu and dL/d eta from a backward launch's partial sums, in one launch."""
    grad_nu = part.new_empty(samples, c)
    grad_w, grad_eta = part.new_empty(c), part.new_empty(c)
    block_s, block_c = _column_tiles(samples, c)
    _finish_sums[(triton.cdiv(c, block_c),)](part, eta, grad_nu, grad_w, grad_eta, samples, blocks, c,
                                             part.numel() // 3, *strides, BLOCK_S=block_s, BLOCK_C=block_c)
    return grad_w, grad_nu, grad_eta


def bn_site_stats(c, weight, bias, eps: float, running, ln_weight, ln_bias, ln_eps: float, filters, filter_eps: float):
    """As composite.bn_site_stats: one pass over c in its own dtype for the planes' moments, one launch for
    the BatchNorm's coefficients, GAP(x_t) and the filter norms, one for term-B, all into one buffer."""
    if running is not None or not c.is_contiguous() or c.dtype == torch.float64 or not filters.is_contiguous():
        return composite.bn_site_stats(c, weight, bias, eps, running, ln_weight, ln_bias, ln_eps, filters,
                                       filter_eps)
    b, ch, p = _planes_shape(c)
    stats = c.new_empty(composite.site_stats_numel(b, ch), dtype=torch.float32)
    _plane_moments[(b * ch,)](c, stats, 4 * ch, p, BLOCK=_pow2(p, 16, _BLOCK))  # where gap and nu go
    _bn_terms_launch(stats, weight, bias, b, ch, p, eps, (filters, filter_eps, _site_filters_at(b, ch)))
    _term_b[(b,)](stats, ln_weight, ln_bias, stats, stats, stats, ch, ln_eps, SITE=True, BLOCK_C=_pow2(ch, 16, 1024))
    return stats


def _site_filters_at(b: int, c: int) -> int:
    """Where a conv-BN site's statistics hold inv_w, then the filters' squared norms."""
    return composite.site_stats_numel(b, c) - 2 * c


def bn_site_forward(x, inv, eta, stats):
    b, c, p = _planes_shape(x)
    g = inv.shape[1]
    out = torch.empty_like(x)
    block = _pow2(p, 16, _BLOCK)
    _iieu_planes_fwd[(b * c, triton.cdiv(p, block))](x, inv, stats, stats, eta, out, c, c // g, g, p,
                                                     _site_filters_at(b, c), 4 * c + b * c, BLOCK=block)
    return out


def bn_site_backward(grad_out, c, inv, eta, stats, ln_weight, batch_stats: bool):
    """As composite.bn_site_backward: the two passes over the maps and, between them, two launches for the
    per-sample (term-B) and per-channel arithmetic. The first pass's partial sums share one buffer, the
    per-sample rows (8, B, C) and k1 (B, C) another (small: what each later launch reads whole)."""
    b, ch, p = _planes_shape(c)
    g = inv.shape[1]
    cg = ch // g
    w_at = _site_filters_at(b, ch)
    block_c, block_p = _planes_tiles(p, cg)
    ncb, npb = triton.cdiv(cg, block_c), triton.cdiv(p, block_p)
    slab = b * ch * npb
    work = inv.new_empty(6 * slab + ncb * b * g * p)  # PART (6, B * C, NPB), then GINV_PART (NCB, B * G, P)
    _iieu_bn_sums[(b * g, ncb, npb)](grad_out, c, inv, stats, eta, work, ch, cg, g, p, npb, slab, b * ch, w_at,
                                     BLOCK_C=block_c, BLOCK_P=block_p)
    rows = inv.new_empty(9 * b * ch)
    grad_inv = torch.empty_like(inv)
    _bn_rows[(b,)](work, stats, ln_weight, rows, grad_inv, ch, npb, slab, b * ch, p, ncb, g * p,
                   BLOCK_C=_pow2(ch, 16, 1024))
    per_channel = inv.new_empty(7, ch)
    block_b, block = _column_tiles(b, ch)
    _bn_channels[(triton.cdiv(ch, block),)](rows, stats, eta, per_channel, b, ch, b * ch, b * p,
                                            BATCH_STATS=batch_stats, BLOCK_B=block_b, BLOCK_C=block)
    grad_w, grad_eta, grad_gamma, grad_beta, k2, grad_ln_weight, grad_ln_bias = per_channel
    grad_c = torch.empty_like(c)
    block = _pow2(p, 16, _BLOCK)
    _iieu_bn_grad[(b * ch, triton.cdiv(p, block))](grad_out, c, inv, stats, eta, rows, 8 * b * ch, k2, grad_c,
                                                  ch, cg, g, p, w_at, BLOCK=block)
    return composite.NormSiteGrads(grad_c, grad_inv, grad_w, None, grad_eta, grad_gamma, grad_beta, grad_ln_weight,
                                   grad_ln_bias)


def bn_site_filter_grad(filters, stats, grad_inv_w, filter_eps: float):
    """As composite.bn_site_filter_grad: one pass over the filters, their squared norms read from the site's
    statistics."""
    r = filters.shape[0]
    if not filters.is_contiguous():
        return composite.bn_site_filter_grad(filters, stats, grad_inv_w, filter_eps)
    k = filters.numel() // r
    grad = torch.empty_like(filters)
    block_r, block_k = _norm_blocks(k)
    _rows_inv_norm_bwd[(triton.cdiv(r, block_r),)](filters, stats, grad_inv_w, grad, grad, r, k, filter_eps, -1.0,
                                                   stats.numel() - r, 0, 0, 1, HAS_ADD=False, HAS_SPREAD=False,
                                                   BLOCK_R=block_r, BLOCK_K=block_k)
    return grad


def term_b_forward(gap, weight, bias, eps: float):
    if gap.dtype != torch.float32 or not gap.is_contiguous():
        return composite.term_b_forward(gap, weight, bias, eps)
    b, c = gap.shape
    nu = torch.empty_like(gap)
    mean, rstd = gap.new_empty(b, 1), gap.new_empty(b, 1)
    _term_b[(b,)](gap, weight, bias, nu, mean, rstd, c, eps, SITE=False, BLOCK_C=_pow2(c, 16, 1024))
    return nu, mean, rstd


@triton.jit
def _term_b_bwd(GNU, NU, GAP, MEAN, RSTD, LN_W, WORK, C, BC, BLOCK_C: tl.constexpr):
    """Program per sample b: ``_term_b_bwd_row``."""
    b = tl.program_id(0).to(tl.int64)
    _term_b_bwd_row(GNU, NU, GAP, tl.load(MEAN + b), tl.load(RSTD + b), LN_W, WORK, b, C, BC, BLOCK_C)


@triton.jit
def _term_b_bwd_row(GNU, NU, GAP, mean, rstd, LN_W, WORK, b, C, BC, BLOCK_C: tl.constexpr):
    """Term-B's backward of sample b over its C channels (rows of C in GNU, NU and GAP), nu = sigmoid(z),
    z = LayerNorm(gap) * w + bias, with the LayerNorm's mean and rstd. WORK (3, B, C) (BC = B * C): dL/d gap,
    dL/dz and dL/dz * the normalised gap (the last two summed over the batch are the LayerNorm's bias and
    weight gradients). GNU may be WORK's first row (read before it is written)."""
    acc_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        live = cc < C
        row = b * C + cc
        nu = tl.load(NU + row, mask=live, other=0.0)
        gz = tl.load(GNU + row, mask=live, other=0.0) * nu * (1.0 - nu)
        x_ln = (tl.load(GAP + row, mask=live, other=0.0) - mean) * rstd
        tl.store(WORK + BC + row, gz, mask=live)
        tl.store(WORK + 2 * BC + row, gz * x_ln, mask=live)
        gzw = gz * tl.load(LN_W + cc, mask=live, other=0.0)
        acc_a += gzw
        acc_b += gzw * x_ln
    mean_a = tl.sum(acc_a, axis=0) / C
    mean_b = tl.sum(acc_b, axis=0) / C
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        live = cc < C
        row = b * C + cc
        gzw = tl.load(WORK + BC + row, mask=live, other=0.0) * tl.load(LN_W + cc, mask=live, other=0.0)
        x_ln = (tl.load(GAP + row, mask=live, other=0.0) - mean) * rstd
        tl.store(WORK + row, rstd * (gzw - mean_a - x_ln * mean_b), mask=live)


@triton.jit
def _ln_param_sums(WORK, LN_GRADS, B, C, cc, live_c, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """LN_GRADS (2, C) at channels cc: the LayerNorm's weight and bias gradients, WORK's rows 2 and 1
    summed over the batch."""
    tl.store(LN_GRADS + cc, _column_sum(WORK + 2 * B * C, B, C, cc, live_c, BLOCK_B, BLOCK_C), mask=live_c)
    tl.store(LN_GRADS + C + cc, _column_sum(WORK + B * C, B, C, cc, live_c, BLOCK_B, BLOCK_C), mask=live_c)


@triton.jit
def _spread_planes(GX, WORK, LN_GRADS, B, C, P, scale, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr):
    """Program (b * C + c, position block): dL/d x_t += scale * dL/d gap (WORK's row 0) over the plane;
    the programs of sample 0's first position block also sum the LayerNorm's gradients of their channel."""
    bc = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = offs < P
    gx = tl.load(GX + bc * P + offs, mask=live, other=0.0).to(tl.float32)
    tl.store(GX + bc * P + offs, (gx + scale * tl.load(WORK + bc)).to(GX.dtype.element_ty), mask=live)
    if (bc < C) & (tl.program_id(1) == 0):
        cc = bc + tl.arange(0, 1)
        _ln_param_sums(WORK, LN_GRADS, B, C, cc, cc < C, BLOCK_B, 1)


@triton.jit
def _spread_rows(GX, WORK, LN_GRADS, S, C, T, scale, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_S: tl.constexpr):
    """Program (sample, token block, channel block): dL/d x_t += scale * dL/d gap (WORK's row 0) at the
    block's rows; the programs of sample 0's first token block also sum the LayerNorm's gradients of
    their channels."""
    s = tl.program_id(0).to(tl.int64)
    tt = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    cc = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    live_c = cc < C
    live = (tt < T)[:, None] & live_c[None, :]
    at = (s * T + tt)[:, None] * C + cc[None, :]
    g = scale * tl.load(WORK + s * C + cc, mask=live_c, other=0.0)
    gx = tl.load(GX + at, mask=live, other=0.0).to(tl.float32)
    tl.store(GX + at, (gx + g[None, :]).to(GX.dtype.element_ty), mask=live)
    if (s == 0) & (tl.program_id(1) == 0):
        _ln_param_sums(WORK, LN_GRADS, S, C, cc, live_c, BLOCK_S, BLOCK_C)


def term_b_backward_into_(grad_x, grad_nu, nu, gap, mean, rstd, weight, bias, scale: float):
    """As composite.term_b_backward_into_: term-B's backward over (B, C) in one launch, and a second that
    spreads dL/d gap over grad_x in place and sums the LayerNorm's gradients over the batch."""
    if not (grad_x.is_contiguous() and gap.is_contiguous() and gap.dtype == torch.float32):
        return composite.term_b_backward_into_(grad_x, grad_nu, nu, gap, mean, rstd, weight, bias, scale)
    b, c = gap.shape
    work = gap.new_empty(3, b, c)
    _term_b_bwd[(b,)](grad_nu.contiguous(), nu.contiguous(), gap, mean, rstd, weight, work, c, b * c,
                      BLOCK_C=_pow2(c, 16, 1024))
    ln_grads = gap.new_empty(2, c)
    if grad_x.dim() != 2:
        p = math.prod(grad_x.shape[2:])
        block = _pow2(p, 16, _BLOCK)
        _spread_planes[(b * c, triton.cdiv(p, block))](grad_x, work, ln_grads, b, c, p, scale, BLOCK=block,
                                                       BLOCK_B=_pow2(b, 1, 128))
    else:
        t = grad_x.shape[0] // b
        block_c = _pow2(c, 16, 128)
        block_t = _pow2(t, 1, max(1, _TILE // block_c))
        _spread_rows[(b, triton.cdiv(t, block_t), triton.cdiv(c, block_c))](
            grad_x, work, ln_grads, b, c, t, scale, BLOCK_T=block_t, BLOCK_C=block_c,
            BLOCK_S=_pow2(b, 1, max(1, 2048 // block_c)))
    return ln_grads.unbind(0)


@triton.jit
def _rounded(x, ROUND: tl.constexpr):
    """x (float32) rounded to the dtype a Linear multiplied in: ROUND 1 bfloat16, 2 float16, 0 as it is; to
    the nearest, ties to even, as torch casts (bfloat16 on the bits: Triton's interpreter truncates)."""
    if ROUND == 1:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    if ROUND == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _filter_tile(WEIGHT, cc, kk, C, K, ROUND: tl.constexpr):
    """The (len(cc), len(kk)) tile of a Linear's weight (C, K) in float32, rounded as its product rounded it
    (``_rounded``); 0 outside the weight."""
    live = (cc < C)[:, None] & (kk < K)[None, :]
    return _rounded(tl.load(WEIGHT + cc[:, None] * K + kk[None, :], mask=live, other=0.0).to(tl.float32), ROUND)


@triton.jit
def _linear_site_stats(X, WEIGHT, BIAS, LN_W, LN_B, STATS, S, T, K, C, eps, silent, filter_eps, ln_eps,
                       PRE_AT, GAP_AT, NU_AT, MEAN_AT, RSTD_AT, W_AT, HAS_BIAS: tl.constexpr, ROUND: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """A Linear site's statistics (``composite.linear_site_parts``; offsets into STATS). Program s < S:
    sample s's T rows of x_pre (K each): their inverse and squared norms, the mean of its rows (rounded to
    the product dtype, ``_rounded``), GAP(x_t) = that mean @ W^T + bias, then term-B. Programs S and on:
    the inverse and squared norms of BLOCK_R filters each."""
    pid = tl.program_id(0)
    if pid < S:
        s = pid.to(tl.int64)
        for t0 in range(0, T, BLOCK_T):
            tt = t0 + tl.arange(0, BLOCK_T)
            live_t = tt < T
            acc = tl.zeros([BLOCK_T], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                live = live_t[:, None] & (kk < K)[None, :]
                x = tl.load(X + (s * T + tt)[:, None] * K + kk[None, :], mask=live, other=0.0).to(tl.float32)
                acc += tl.sum(x * x, axis=1)
            norm = tl.sqrt(acc)
            inv = tl.where((silent >= 0) & (norm < silent), 0.0, 1.0 / (norm + eps))
            tl.store(STATS + s * T + tt, inv, mask=live_t)
            tl.store(STATS + S * T + s * T + tt, acc, mask=live_t)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            col = tl.zeros([BLOCK_K], dtype=tl.float32)
            for t0 in range(0, T, BLOCK_T):
                tt = t0 + tl.arange(0, BLOCK_T)
                live = (tt < T)[:, None] & (kk < K)[None, :]
                x = tl.load(X + (s * T + tt)[:, None] * K + kk[None, :], mask=live, other=0.0).to(tl.float32)
                col += tl.sum(_rounded(x, ROUND), axis=0)
            tl.store(STATS + PRE_AT + s * K + kk, col / T, mask=kk < K)
        tl.debug_barrier()
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            live_c = cc < C
            gap = tl.zeros([BLOCK_C], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                m = tl.load(STATS + PRE_AT + s * K + kk, mask=kk < K, other=0.0)
                gap += tl.sum(_filter_tile(WEIGHT, cc, kk, C, K, ROUND) * m[None, :], axis=1)
            if HAS_BIAS:
                gap += _rounded(tl.load(BIAS + cc, mask=live_c, other=0.0).to(tl.float32), ROUND)
            tl.store(STATS + GAP_AT + s * C + cc, gap, mask=live_c)
        tl.debug_barrier()
        _term_b_row(STATS + GAP_AT, LN_W, LN_B, STATS + NU_AT, STATS + MEAN_AT, STATS + RSTD_AT, s, C, ln_eps, BLOCK_C)
    else:
        rows = (pid - S) * BLOCK_R + tl.arange(0, BLOCK_R)
        _filter_norms(WEIGHT, STATS + W_AT, STATS + W_AT + C, rows, rows < C, K, filter_eps, BLOCK_R, BLOCK_K)


@triton.jit
def _linear_site_sample(WORK, STATS, LN_W, WEIGHT, C, K, T, NTB, SLAB, GAP_AT, NU_AT, MEAN_AT, RSTD_AT, SPREAD_AT,
                        ROUND: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program per sample s after ``_iieu_rows_bwd`` (its partial sums at the start of WORK, (3, S * NTB, C)):
    dL/d nu = slab 1 summed over the sample's NTB token blocks; term-B's backward (``_term_b_bwd_row``,
    into WORK's (3, S, C) after the partial sums); then the per-sample term of dL/d x_pre,
    dL/d gap @ W / T (W rounded as forward), into STATS at SPREAD_AT."""
    s = tl.program_id(0).to(tl.int64)
    BC = tl.num_programs(0) * C
    TB = WORK + 3 * SLAB
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        live_c = cc < C
        g_nu = tl.zeros([BLOCK_C], dtype=tl.float32)
        for kb in range(0, NTB):
            g_nu += tl.load(WORK + SLAB + (s * NTB + kb) * C + cc, mask=live_c, other=0.0)
        tl.store(TB + s * C + cc, g_nu, mask=live_c)
    _term_b_bwd_row(TB, STATS + NU_AT, STATS + GAP_AT, tl.load(STATS + MEAN_AT + s), tl.load(STATS + RSTD_AT + s),
                    LN_W, TB, s, C, BC, BLOCK_C)
    tl.debug_barrier()
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        live_k = kk < K
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            live_c = cc < C
            g = tl.load(TB + s * C + cc, mask=live_c, other=0.0)
            acc += tl.sum(g[:, None] * _filter_tile(WEIGHT, cc, kk, C, K, ROUND), axis=0)
        tl.store(STATS + SPREAD_AT + s * K + kk, acc / T, mask=live_k)


@triton.jit
def _linear_site_channels(WORK, STATS, ETA, WEIGHT, PER_CHANNEL, GW, S, C, K, NK, SLAB, PRE_AT, W_AT,
                          BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program per channel block after ``_linear_site_sample``: PER_CHANNEL (4, C) = dL/d eta, the LayerNorm's
    weight and bias gradients and dL/d bias (sums over the NK = S * NTB partial rows and over the samples),
    and the filters' gradient GW (C, K): through their inverse norms (dL/d inv_w from the partial sums)
    plus dL/d gap^T @ the rows' means (GAP's product)."""
    cc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    live_c = cc < C
    TB = WORK + 3 * SLAB
    BC = S * C
    g_w = _column_sum(WORK, NK, C, cc, live_c, BLOCK_S, BLOCK_C)
    g_eta = _column_sum(WORK + 2 * SLAB, NK, C, cc, live_c, BLOCK_S, BLOCK_C)
    tl.store(PER_CHANNEL + cc, g_eta * (1.0 - tl.load(ETA + cc, mask=live_c, other=0.0)), mask=live_c)
    tl.store(PER_CHANNEL + C + cc, _column_sum(TB + 2 * BC, S, C, cc, live_c, BLOCK_S, BLOCK_C), mask=live_c)
    tl.store(PER_CHANNEL + 2 * C + cc, _column_sum(TB + BC, S, C, cc, live_c, BLOCK_S, BLOCK_C), mask=live_c)
    tl.store(PER_CHANNEL + 3 * C + cc, _column_sum(TB, S, C, cc, live_c, BLOCK_S, BLOCK_C), mask=live_c)
    inv_w = tl.load(STATS + W_AT + cc, mask=live_c, other=0.0)
    norm = tl.sqrt(tl.load(STATS + W_AT + C + cc, mask=live_c, other=0.0))
    g_sumsq = tl.where(norm > 0, -g_w * inv_w * inv_w / (2 * tl.where(norm > 0, norm, 1.0)), 0.0)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        live = live_c[:, None] & (kk < K)[None, :]
        at = cc[:, None].to(tl.int64) * K + kk[None, :]
        acc = 2 * tl.load(WEIGHT + at, mask=live, other=0.0).to(tl.float32) * g_sumsq[:, None]
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            live_s = ss < S
            g_gap = tl.load(TB + ss[None, :] * C + cc[:, None], mask=live_s[None, :] & live_c[:, None], other=0.0)
            pre = tl.load(STATS + PRE_AT + ss[:, None] * K + kk[None, :], mask=live_s[:, None] & (kk < K)[None, :],
                          other=0.0)
            acc += tl.dot(g_gap, pre, input_precision="ieee")
        tl.store(GW + at, acc.to(GW.dtype.element_ty), mask=live)


_ROUND = {torch.bfloat16: 1, torch.float16: 2}


def _linear_site_blocks(k: int, c: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_C) of the Linear site's kernels: (BLOCK_C, BLOCK_K) tiles of the filters."""
    block_k = _pow2(k, 16, 128)
    return block_k, _pow2(c, 16, max(16, _TILE // block_k))


def linear_site_stats(x_pre, product_dtype, weight, bias, ln_weight, ln_bias, ln_eps: float, eps: float,
                      silent: float, filter_eps: float):
    """As composite.linear_site_stats, in one launch: a program per sample (its rows' norms and mean, GAP,
    term-B) and one per block of filters (their norms)."""
    if x_pre.dtype == torch.float64 or not (x_pre.is_contiguous() and weight.is_contiguous()):
        return composite.linear_site_stats(x_pre, product_dtype, weight, bias, ln_weight, ln_bias, ln_eps, eps,
                                           silent, filter_eps)
    s, r, k = composite.site_rows(x_pre)
    c = weight.shape[0]
    t = r // s
    at = composite.linear_site_offsets(s, r, c, k)
    stats = x_pre.new_empty(composite.linear_site_numel(s, r, c, k), dtype=torch.float32)
    block_k, block_c = _linear_site_blocks(k, c)
    block_r = max(1, _TILE // block_k)
    _linear_site_stats[(s + triton.cdiv(c, block_r),)](
        x_pre, weight, ln_bias if bias is None else bias, ln_weight, ln_bias, stats, s, t, k, c, eps, silent,
        filter_eps, ln_eps, at.pre_mean, at.gap, at.nu, at.mean, at.rstd, at.inv_w, HAS_BIAS=bias is not None,
        ROUND=_ROUND.get(product_dtype, 0), BLOCK_T=_pow2(t, 1, max(1, _TILE // block_k)), BLOCK_K=block_k,
        BLOCK_C=block_c, BLOCK_R=block_r)
    return stats


def linear_site_forward(x, eta, stats, k: int):
    """As composite.linear_site_forward: the rows kernel reading the site's statistics."""
    if x.dtype == torch.float64 or not x.is_contiguous():
        return composite.linear_site_forward(x, eta, stats, k)
    s, r, c = composite.site_rows(x)
    t = r // s
    at = composite.linear_site_offsets(s, r, c, k)
    out = torch.empty_like(x)
    block_t, block_c = _rows_tiles(t, c)
    _iieu_rows_fwd[(s, triton.cdiv(t, block_t))](x, stats, stats, stats, eta, out, c, t, at.inv_x, at.inv_w, at.nu,
                                                  BLOCK_T=block_t, BLOCK_C=block_c)
    return out


def linear_site_backward(grad_out, x, eta, stats, weight, has_bias: bool, ln_weight, filter_eps: float):
    """As composite.linear_site_backward: the pass over the rows, then a launch per sample (term-B and x_pre's
    per-sample term) and one per channel block (the parameters' gradients). The partial sums and term-B's
    rows share one buffer."""
    if x.dtype == torch.float64 or not (x.is_contiguous() and grad_out.is_contiguous() and weight.is_contiguous()):
        return composite.linear_site_backward(grad_out, x, eta, stats, weight, has_bias, ln_weight, filter_eps)
    s, r, c = composite.site_rows(grad_out)
    k = weight.shape[1]
    t = r // s
    at = composite.linear_site_offsets(s, r, c, k)
    block_t, block_c = _rows_tiles(t, c)
    ntb = triton.cdiv(t, block_t)
    slab = s * ntb * c
    work = stats.new_empty(3 * slab + 3 * s * c)
    grad_x = torch.empty_like(grad_out)
    _iieu_rows_bwd[(s, ntb)](grad_out, x, stats, stats, stats, eta, grad_x, stats, work, c, t, ntb, slab, at.inv_x,
                             at.inv_w, at.nu, at.grad_inv, BLOCK_T=block_t, BLOCK_C=block_c)
    block_k, block = _linear_site_blocks(k, c)
    _linear_site_sample[(s,)](work, stats, ln_weight, weight, c, k, t, ntb, slab, at.gap, at.nu, at.mean, at.rstd,
                              at.input_spread, ROUND=_ROUND.get(x.dtype, 0), BLOCK_C=block, BLOCK_K=block_k)
    per_channel = stats.new_empty(4, c)
    grad_filters = torch.empty_like(weight)
    block_c = _pow2(c, 16, 64)
    _linear_site_channels[(triton.cdiv(c, block_c),)](work, stats, eta, weight, per_channel, grad_filters, s, c, k,
                                                      s * ntb, slab, at.pre_mean, at.inv_w, BLOCK_S=16,
                                                      BLOCK_C=block_c, BLOCK_K=_pow2(k, 16, 64))
    grad_eta, grad_ln_weight, grad_ln_bias, grad_bias = per_channel.unbind(0)
    return composite.LinearSiteGrads(grad_x, grad_eta, grad_ln_weight, grad_ln_bias, grad_filters,
                                     grad_bias if has_bias else None)


def linear_site_input_grad(x_pre, stats, c: int, eps: float, silent: float, add=None, into_add: bool = False):
    """As composite.linear_site_input_grad, in one pass over x_pre's rows."""
    if x_pre.dtype == torch.float64 or not x_pre.is_contiguous() or (add is not None and not add.is_contiguous()):
        return composite.linear_site_input_grad(x_pre, stats, c, eps, silent, add, into_add)
    s, r, k = composite.site_rows(x_pre)
    at = composite.linear_site_offsets(s, r, c, k)
    grad_x = add if into_add else torch.empty_like(x_pre if add is None else add)
    block_r, block_k = _norm_blocks(k)
    _rows_inv_norm_bwd[(triton.cdiv(r, block_r),)](x_pre, stats, stats, grad_x if add is None else add, grad_x, r, k,
                                                   eps, silent, at.sumsq, at.grad_inv, at.input_spread, r // s,
                                                   HAS_ADD=add is not None, HAS_SPREAD=True, BLOCK_R=block_r,
                                                   BLOCK_K=block_k)
    return grad_x


def batch_moments(x):
    if not x.is_contiguous() or x.dtype == torch.float64:
        return composite.batch_moments(x)
    b, c, p = _planes_shape(x)
    moments = x.new_empty(2, b, c, dtype=torch.float32)
    _plane_moments[(b * c,)](x, moments, 0, p, BLOCK=_pow2(p, 16, _BLOCK))
    plane_mean, plane_m2 = moments.double()
    return composite.combine_moments(plane_mean, plane_m2 / p)


def _bn_terms_launch(buffer, weight, bias, b: int, c: int, p: int, eps: float, filters=None):
    """``_bn_terms`` over ``buffer``; ``filters``: (filters, eps, where in buffer) for their norms too."""
    block_b, block = _column_tiles(b, c)
    rows, filter_eps, filters_at = filters if filters is not None else (buffer, 0.0, 0)
    k = rows.numel() // rows.shape[0] if filters is not None else 1
    _bn_terms[(triton.cdiv(c, block),)](buffer, weight if weight is not None else buffer,
                                        bias if bias is not None else buffer, rows, b, c, p, eps, k, filter_eps,
                                        filters_at, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                                        HAS_FILTERS=filters is not None, BLOCK_B=block_b, BLOCK_C=block,
                                        BLOCK_K=min(256, max(16, _TILE // block)))


def batchnorm_terms(c, weight, bias, eps: float):
    """As composite.batchnorm_terms: one pass over c in its own dtype, one launch for the per-channel
    coefficients and GAP(x_t), in one buffer."""
    if not c.is_contiguous() or c.dtype == torch.float64:
        return composite.batchnorm_terms(c, weight, bias, eps)
    b, ch, p = _planes_shape(c)
    buffer = c.new_empty(4 * ch + 2 * b * ch, dtype=torch.float32)  # terms, then the moments (gap over the means)
    _plane_moments[(b * ch,)](c, buffer, 4 * ch, p, BLOCK=_pow2(p, 16, _BLOCK))
    _bn_terms_launch(buffer, weight, bias, b, ch, p, eps)
    terms, gap, _ = buffer.split([4 * ch, b * ch, b * ch])
    return (*terms.view(4, ch), gap.view(b, ch))


def _channel_sumsq_launch(x, groups: int, ct: torch.dtype, inverse: tuple | None):
    """sumsq (B, G, *S) of a contiguous x and, given ``inverse`` = (eps, silent), the inverse norms."""
    b, c = x.shape[:2]
    p = math.prod(x.shape[2:])
    out = x.new_empty((b, groups, *x.shape[2:]), dtype=ct)
    inv = torch.empty_like(out) if inverse is not None else out
    block_p = _pow2(p, 16, 256)
    block_c = _pow2(c // groups, 1, max(1, _TILE // block_p))
    _channel_sumsq[(b * groups, triton.cdiv(p, block_p))](x, out, inv, c // groups, p, *(inverse or (0.0, 0.0)),
                                                          WITH_INV=inverse is not None, BLOCK_C=block_c,
                                                          BLOCK_P=block_p)
    return inv, out


def channel_sumsq(x, groups: int, ct: torch.dtype):
    if not x.is_contiguous() or ct == torch.float64:
        return composite.channel_sumsq(x, groups, ct)
    return _channel_sumsq_launch(x, groups, ct, None)[1]


def channel_inv_norm(x, groups: int, ct: torch.dtype, eps: float, silent: float):
    if not x.is_contiguous() or ct == torch.float64:
        return composite.channel_inv_norm(x, groups, ct, eps, silent)
    return _channel_sumsq_launch(x, groups, ct, (eps, silent))


def _channel_scale_launch(x, scale, ginv, add, into_add: bool, norms: tuple | None):
    b, c = x.shape[:2]
    p = math.prod(x.shape[2:])
    out = add if into_add else torch.empty_like(x if add is None else add)
    block = _pow2(p, 16, _BLOCK)
    _channel_scale[(b * c, triton.cdiv(p, block))](x, scale, ginv, out if add is None else add, out,
                                                   c // scale.shape[1], p, *(norms or (0.0, 0.0)),
                                                   HAS_ADD=add is not None, FROM_NORMS=norms is not None, BLOCK=block)
    return out


def _dense(x, *others) -> bool:
    return x.dtype != torch.float64 and all(t is None or t.is_contiguous() for t in (x, *others))


def channel_scale(x, scale, add=None, into_add: bool = False):
    if not _dense(x, scale, add):
        return composite.channel_scale(x, scale, add, into_add)
    return _channel_scale_launch(x, scale, scale, add, into_add, None)


def channel_norm_grad_scale(x, sumsq, grad_inv, eps: float, silent: float, add=None, into_add: bool = False):
    if not _dense(x, sumsq, grad_inv, add) or sumsq.dtype != torch.float32:
        return composite.channel_norm_grad_scale(x, sumsq, grad_inv, eps, silent, add, into_add)
    return _channel_scale_launch(x, sumsq, grad_inv, add, into_add, (eps, silent))


def inverse_norm(sumsq, eps: float, silent: float):
    if not sumsq.is_contiguous() or sumsq.dtype != torch.float32:
        return composite.inverse_norm(sumsq, eps, silent)
    inv = torch.empty_like(sumsq)
    n = sumsq.numel()
    _inverse_norm[(triton.cdiv(n, _BLOCK),)](sumsq, inv, n, eps, silent, BLOCK=_BLOCK)
    return inv


def _window_args(window, h: int, w: int) -> tuple:
    (kh, kw), (sh, sw), (dh, dw) = window.kernel_size, window.stride, window.dilation
    left, _, top, _ = window.pads
    oh, ow = window.output_hw(h, w)
    return (h, w, oh, ow), dict(KH=kh, KW=kw), (sh, sw, dh, dw, top, left)


def window_inv_norm(sq, window, eps: float, silent: float):
    if not sq.is_contiguous() or sq.dtype != torch.float32:
        return composite.window_inv_norm(sq, window, eps, silent)
    b, g, h, w = sq.shape
    sizes, constants, geometry = _window_args(window, h, w)
    inv = sq.new_empty(b, g, *sizes[2:])
    sumsq = torch.empty_like(inv)
    block = _pow2(sizes[2] * sizes[3], 16, _BLOCK)
    _window_inv_norm[(b * g, triton.cdiv(sizes[2] * sizes[3], block))](sq, inv, sumsq, *sizes, *geometry, eps, silent,
                                                                       BLOCK=block, **constants)
    return inv, sumsq


def window_inv_norm_backward(sumsq, grad_inv, hw, window, eps: float, silent: float):
    if not (sumsq.is_contiguous() and grad_inv.is_contiguous()) or sumsq.dtype != torch.float32:
        return composite.window_inv_norm_backward(sumsq, grad_inv, hw, window, eps, silent)
    b, g = sumsq.shape[:2]
    sizes, constants, geometry = _window_args(window, *hw)
    factor = sumsq.new_empty(b, g, *hw)
    block = _pow2(hw[0] * hw[1], 16, _BLOCK)
    _window_inv_norm_bwd[(b * g, triton.cdiv(hw[0] * hw[1], block))](sumsq, grad_inv, factor, *sizes, *geometry, eps,
                                                                     silent, BLOCK=block, **constants)
    return factor


def inv_norm_grad_sumsq(sumsq, grad_inv, eps: float, silent: float):
    if not (sumsq.is_contiguous() and grad_inv.is_contiguous()) or sumsq.dtype != torch.float32 \
            or grad_inv.dtype != torch.float32:
        return composite.inv_norm_grad_sumsq(sumsq, grad_inv, eps, silent)
    grad = torch.empty_like(sumsq)
    n = sumsq.numel()
    _inv_norm_grad[(triton.cdiv(n, _BLOCK),)](sumsq, grad_inv, grad, n, eps, silent, BLOCK=_BLOCK)
    return grad


def _norm_blocks(k: int) -> tuple[int, int]:
    block_k = _pow2(k, 16, 256)
    return max(1, 4096 // block_k), block_k


def rows_inv_norm(x, eps: float, silent: float):
    r = x.shape[0]
    k = x.numel() // r  # rows of any trailing shape (conv filters as they are), read through the pointer
    inv = x.new_empty(r, dtype=torch.float32)
    sumsq = torch.empty_like(inv)
    block_r, block_k = _norm_blocks(k)
    _rows_inv_norm[(triton.cdiv(r, block_r),)](x, inv, sumsq, r, k, eps, silent, BLOCK_R=block_r, BLOCK_K=block_k)
    return inv, sumsq


def rows_inv_norm_backward(x, sumsq, grad_inv, eps: float, silent: float):
    return rows_norm_grad_scale(x, sumsq, grad_inv, eps, silent)


def rows_norm_grad_scale(x, sumsq, grad_inv, eps: float, silent: float, add=None, into_add: bool = False):
    if add is not None and not add.is_contiguous():
        return composite.rows_norm_grad_scale(x, sumsq, grad_inv, eps, silent, add, into_add)
    r = x.shape[0]
    k = x.numel() // r
    grad_x = add if into_add else torch.empty_like(x if add is None else add)
    block_r, block_k = _norm_blocks(k)
    _rows_inv_norm_bwd[(triton.cdiv(r, block_r),)](x, sumsq, grad_inv, grad_x if add is None else add, grad_x, r, k,
                                                   eps, silent, 0, 0, 0, 1, HAS_ADD=add is not None, HAS_SPREAD=False,
                                                   BLOCK_R=block_r, BLOCK_K=block_k)
    return grad_x


def tau_pool(x, tau: float, tokens: bool):
    out = torch.empty_like(x)
    if tokens:
        b, n, c = x.shape
        v = x.new_empty(b, c, dtype=torch.float32)
        block_c = _pow2(c, 16, 256)
        _tau_pool_tokens[(b, triton.cdiv(c, block_c))](x, out, v, n, c, tau, BLOCK_C=block_c)
    else:
        b, c, p = x.shape
        v = x.new_empty(b, c, dtype=torch.float32)
        _tau_pool_maps[(b * c,)](x, out, v, p, tau, BLOCK=_pow2(p, 16, _BLOCK))
    return out, v, pass_mask(x, tau)


def pass_mask(x, tau: float):
    numel = x.numel()
    passes = x.new_empty(composite.packed_size(numel), dtype=torch.uint8)
    _pack_passes[(triton.cdiv(passes.numel(), 128),)](x, passes, numel, tau, BLOCK_BYTES=128)
    return passes


def tau_pool_backward(grad_out, passes, grad_v, tokens: bool, cls: bool = False):
    """As the composite's; maps may keep their spatial dims, grad_v's rows may be strided (a slice of the
    channel loss's concatenation)."""
    if grad_v is not None and grad_v.stride(1) != 1:
        grad_v = grad_v.contiguous()
    grad_x = torch.empty_like(grad_out)
    numel = grad_out.numel()
    n = grad_out.shape[1] if tokens else 1
    c = grad_out.shape[2] if tokens else grad_out.shape[1]
    p = 1 if tokens else numel // (grad_out.shape[0] * grad_out.shape[1])  # maps: (B, C, *S)
    gv = grad_v if grad_v is not None else passes  # never read without HAS_GV
    gv_row = grad_v.stride(0) if grad_v is not None else 0
    _tau_pool_bwd[(triton.cdiv(numel, _BLOCK),)](grad_out, passes, gv, grad_x, numel, p, n, c, gv_row, TOKENS=tokens,
                                                 CLS=cls, HAS_GV=grad_v is not None, BLOCK=_BLOCK)
    return grad_x


masked_grad = composite.masked_grad


def dpa_mask(v, value_rows, grad_memory, labels, tau: float, gather: bool):
    b, c = v.shape
    mask = torch.empty(b, c, dtype=torch.bool, device=v.device)
    block_c = _pow2(c, 16, 1024)
    _dpa_mask[(b, triton.cdiv(c, block_c))](v.contiguous(), value_rows.contiguous(), grad_memory.contiguous(),
                                            labels.contiguous(), mask, c, tau, GATHER=gather, BLOCK_C=block_c)
    return mask


def dpa_forward(x, tau: float, tokens: bool, memories=None, labels=None, count=None, cls: bool = False):
    if tokens and x.shape[2] % 8:  # a token's flags would share bytes with the next token's
        return composite.dpa_forward(x, tau, tokens, memories, labels, count, cls, pool=tau_pool)
    out = torch.empty_like(x)
    b, c = (x.shape[0], x.shape[2]) if tokens else x.shape[:2]
    v = x.new_empty(b, c, dtype=torch.float32)
    passes = x.new_empty(composite.packed_size(x.numel()), dtype=torch.uint8)
    mask = None if memories is None else torch.empty(b, c, dtype=torch.bool, device=x.device)
    vmem, gmem = memories if memories is not None else (v, v)  # never read without HAS_MASK
    buffer, value = count if count is not None else (v, 0)
    refs = (vmem, gmem, labels if labels is not None else v, mask if mask is not None else v, buffer, value)
    flags = {"HAS_MASK": memories is not None, "HAS_COUNT": count is not None}
    if tokens:
        block_c = _pow2(c, 16, 256)
        _dpa_tokens[(b, triton.cdiv(c, block_c))](x, out, v, passes, *refs, x.shape[1], c, tau, CLS=cls,
                                                  BLOCK_C=block_c, **flags)
    else:
        p = x.numel() // (b * c)
        _dpa_planes[(triton.cdiv(b * c, 8),)](x, out, v, passes, *refs, p, c, b * c, tau,
                                              BLOCK_BYTES=_pow2(p, 16, 128), **flags)
    return out, v, passes, mask


_SCAN_TILE = 8192  # elements of the scan's (batch, channels) tile: batches above this use the composite


def ema_update_(memory, labels, values, alpha: float, order=None, signs: bool = False, after: bool = True,
                enabled=None):
    b, c = values.shape
    if b > _SCAN_TILE or b == 0 or memory.dtype != torch.float32 or not memory.is_contiguous():
        return composite.ema_update_(memory, labels, values, alpha, order, signs, after, enabled)
    ys, src = order if order is not None else torch.sort(labels, stable=True)
    rows = torch.empty(b, c, dtype=memory.dtype, device=memory.device) if after else memory
    block_b = _pow2(b, 1, _SCAN_TILE)
    block_c = _pow2(c, 1, max(1, _SCAN_TILE // block_b))
    flag = enabled if enabled is not None else ys  # never read without HAS_ENABLED
    _ema_scan[(triton.cdiv(c, block_c),)](memory, values.contiguous(), src, ys, rows, flag, b, c, alpha, SIGNS=signs,
                                          HAS_AFTER=after, HAS_ENABLED=enabled is not None, BLOCK_B=block_b,
                                          BLOCK_C=block_c)
    return rows if after else None


# ---- the Dynamic Coupler -------------------------------------------------------------------------------
# Maps are contiguous (B, C, P); rows r = b * C + c. The weight network runs one program per sample.


@triton.jit
def _row_tile(rb, pb, R, P, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    offs = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    live_r = rows < R
    live = live_r[:, None] & (offs < P)[None, :]
    return rows, live_r, live, rows.to(tl.int64)[:, None] * P + offs[None, :]


@triton.jit
def _coupler_pool(MAIN, SHORT, POOLED, R, C, P, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    rb = tl.program_id(0)
    s_main = tl.zeros([BLOCK_R, BLOCK_P], dtype=tl.float32)
    s_short = tl.zeros([BLOCK_R, BLOCK_P], dtype=tl.float32)
    for pb in range(0, tl.cdiv(P, BLOCK_P)):
        rows, live_r, live, at = _row_tile(rb, pb, R, P, BLOCK_R, BLOCK_P)
        s_main += tl.load(MAIN + at, mask=live, other=0.0).to(tl.float32)
        s_short += tl.load(SHORT + at, mask=live, other=0.0).to(tl.float32)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    live_r = rows < R
    dest = (rows // C) * 2 * C + rows % C
    tl.store(POOLED + dest, tl.sum(s_main, axis=1) / P, mask=live_r)
    tl.store(POOLED + dest + C, tl.sum(s_short, axis=1) / P, mask=live_r)


@triton.jit
def _coupler_fuse(MAIN, SHORT, LAM, OUT, R, C, P, LAM_AT, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    LAM = LAM + LAM_AT
    rows, live_r, live, at = _row_tile(tl.program_id(0), tl.program_id(1), R, P, BLOCK_R, BLOCK_P)
    w_at = (rows // C) * 2 * C + rows % C
    w1 = tl.load(LAM + w_at, mask=live_r, other=0.0)
    w2 = tl.load(LAM + w_at + C, mask=live_r, other=0.0)
    m = tl.load(MAIN + at, mask=live, other=0.0).to(tl.float32)
    s = tl.load(SHORT + at, mask=live, other=0.0).to(tl.float32)
    tl.store(OUT + at, (w1[:, None] * m + w2[:, None] * s).to(OUT.dtype.element_ty), mask=live)


@triton.jit
def _coupler_weight_grads(GRAD, OUT, SHORT, LAM, GLAM, R, C, P, LAM_AT, GLAM_AT, BLOCK_R: tl.constexpr,
                          BLOCK_P: tl.constexpr):
    LAM = LAM + LAM_AT
    GLAM = GLAM + GLAM_AT
    rb = tl.program_id(0)
    s_out = tl.zeros([BLOCK_R, BLOCK_P], dtype=tl.float32)
    s_short = tl.zeros([BLOCK_R, BLOCK_P], dtype=tl.float32)
    for pb in range(0, tl.cdiv(P, BLOCK_P)):
        rows, live_r, live, at = _row_tile(rb, pb, R, P, BLOCK_R, BLOCK_P)
        g = tl.load(GRAD + at, mask=live, other=0.0).to(tl.float32)
        s_out += g * tl.load(OUT + at, mask=live, other=0.0).to(tl.float32)
        s_short += g * tl.load(SHORT + at, mask=live, other=0.0).to(tl.float32)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    live_r = rows < R
    dest = (rows // C) * 2 * C + rows % C
    w1 = tl.load(LAM + dest, mask=live_r, other=1.0)
    w2 = tl.load(LAM + dest + C, mask=live_r, other=0.0)
    sum_short = tl.sum(s_short, axis=1)
    tl.store(GLAM + dest, (tl.sum(s_out, axis=1) - w2 * sum_short) / w1, mask=live_r)
    tl.store(GLAM + dest + C, sum_short, mask=live_r)


@triton.jit
def _coupler_grads(GRAD, LAM, ADD, GM, GS, R, C, P, LAM_AT, ADD_AT, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    _coupler_branch_grads(GRAD, LAM + LAM_AT, ADD + ADD_AT, GM, GS, R, C, P, tl.program_id(0), tl.program_id(1),
                          BLOCK_R, BLOCK_P)


@triton.jit
def _coupler_branch_grads(GRAD, LAM, ADD, GM, GS, R, C, P, rb, pb, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """The branch gradients of row block rb, position block pb: grad * l1 + add[:, :C], grad * l2 + add[:, C:]."""
    rows, live_r, live, at = _row_tile(rb, pb, R, P, BLOCK_R, BLOCK_P)
    w_at = (rows // C) * 2 * C + rows % C
    w1 = tl.load(LAM + w_at, mask=live_r, other=0.0)
    w2 = tl.load(LAM + w_at + C, mask=live_r, other=0.0)
    a1 = tl.load(ADD + w_at, mask=live_r, other=0.0)
    a2 = tl.load(ADD + w_at + C, mask=live_r, other=0.0)
    g = tl.load(GRAD + at, mask=live, other=0.0).to(tl.float32)
    tl.store(GM + at, (g * w1[:, None] + a1[:, None]).to(GM.dtype.element_ty), mask=live)
    tl.store(GS + at, (g * w2[:, None] + a2[:, None]).to(GS.dtype.element_ty), mask=live)


@triton.jit
def _row_moments(X, N, BLOCK: tl.constexpr):
    """Mean and biased variance of a length-N float32 row, in two passes."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        acc += tl.load(X + offs, mask=offs < N, other=0.0)
    mean = tl.sum(acc, axis=0) / N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        d = tl.load(X + offs, mask=offs < N, other=0.0) - mean
        acc += tl.where(offs < N, d * d, 0.0)
    return mean, tl.sum(acc, axis=0) / N


@triton.jit
def _coupler_a(PROW, IW, IB, cc, live_c, mean, rstd, C):
    """Rows a_1, a_2 of the input LayerNorm at channels cc, and their normalised values xhat_1, xhat_2."""
    x1 = (tl.load(PROW + cc, mask=live_c, other=0.0) - mean) * rstd
    x2 = (tl.load(PROW + C + cc, mask=live_c, other=0.0) - mean) * rstd
    a1 = tl.where(live_c, x1 * tl.load(IW + cc, mask=live_c, other=0.0) + tl.load(IB + cc, mask=live_c, other=0.0), 0.0)
    a2 = tl.where(live_c, x2 * tl.load(IW + C + cc, mask=live_c, other=0.0) + tl.load(IB + C + cc, mask=live_c,
                                                                                      other=0.0), 0.0)
    return a1, a2, x1, x2


@triton.jit
def _coupler_hidden(PROW, IW, IB, FC1, A, C, hh, live_h, mean, rstd, WRITE_A: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    """h_i = fc1 a_i for both rows, the squared filter norms and ||a_i||^2 (writes a to A when asked)."""
    h1 = tl.zeros([BLOCK_H], dtype=tl.float32)
    h2 = tl.zeros([BLOCK_H], dtype=tl.float32)
    wsq = tl.zeros([BLOCK_H], dtype=tl.float32)
    asq1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    asq2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        live_c = cc < C
        a1, a2, x1, x2 = _coupler_a(PROW, IW, IB, cc, live_c, mean, rstd, C)
        if WRITE_A:
            tl.store(A + cc, a1, mask=live_c)
            tl.store(A + C + cc, a2, mask=live_c)
        w = tl.load(FC1 + hh[:, None] * C + cc[None, :], mask=live_h[:, None] & live_c[None, :], other=0.0)
        w = w.to(tl.float32)
        h1 += tl.sum(w * a1[None, :], axis=1)
        h2 += tl.sum(w * a2[None, :], axis=1)
        wsq += tl.sum(w * w, axis=1)
        asq1 += a1 * a1
        asq2 += a2 * a2
    return h1, h2, wsq, tl.sum(asq1, axis=0), tl.sum(asq2, axis=0)


@triton.jit
def _coupler_row(h, live_h, H, inv_w, asq, RW, RB, e, hh, silent, row_eps, eps):
    """IIEU-B of one hidden row: the output s * h and what its backward needs."""
    m = tl.sum(tl.where(live_h, h, 0.0), axis=0) / H
    cen = tl.where(live_h, h - m, 0.0)
    sd = tl.sqrt(tl.sum(cen * cen, axis=0) / tl.maximum(H - 1, 1))
    nh = cen / (sd + row_eps)
    rw = tl.load(RW + hh, mask=live_h, other=0.0)
    nu = tl.sigmoid(nh * rw + tl.load(RB + hh, mask=live_h, other=0.0))
    norm_a = tl.sqrt(asq)
    inv_x = tl.where(norm_a < silent, 0.0, 1.0 / (norm_a + eps))
    rho = h * (inv_w * inv_x) + nu
    s = _adjusted(rho, e)
    return tl.where(live_h, s * h, 0.0), cen, sd, nh, rw, nu, norm_a, inv_x, rho, s


@triton.jit
def _coupler_z(FC2, ZROW, hp1, hp2, C, H, hh, live_h, BLOCK_C: tl.constexpr):
    """z = fc2 h' for both rows, written to ZROW (2C); returns their sum."""
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        live_c = cc < C
        w = tl.load(FC2 + cc[:, None] * H + hh[None, :], mask=live_c[:, None] & live_h[None, :], other=0.0)
        w = w.to(tl.float32)
        z1 = tl.sum(w * hp1[None, :], axis=1)
        z2 = tl.sum(w * hp2[None, :], axis=1)
        tl.store(ZROW + cc, z1, mask=live_c)
        tl.store(ZROW + C + cc, z2, mask=live_c)
        acc += tl.where(live_c, z1 + z2, 0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _coupler_forward_rows(POOLED, IW, IB, FC1, ETA, RW, RB, C, H, b, hh, live_h, silent, ln_eps, row_eps, eps, A,
                          WRITE_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    """Sample b's input LayerNorm statistics, hidden rows and IIEU-B outputs h'_1, h'_2 (with their terms)."""
    prow = POOLED + b * 2 * C
    mean, var = _row_moments(prow, 2 * C, BLOCK_C)
    rstd = 1.0 / tl.sqrt(var + ln_eps)
    h1, h2, wsq, asq1, asq2 = _coupler_hidden(prow, IW, IB, FC1, A, C, hh, live_h, mean, rstd, WRITE_A,
                                              BLOCK_C, BLOCK_H)
    wnorm = tl.sqrt(wsq)
    inv_w = 1.0 / (wnorm + eps)
    e = tl.load(ETA + hh, mask=live_h, other=0.0)
    row1 = _coupler_row(h1, live_h, H, inv_w, asq1, RW, RB, e, hh, silent, row_eps, eps)
    row2 = _coupler_row(h2, live_h, H, inv_w, asq2, RW + H, RB + H, e, hh, silent, row_eps, eps)
    return mean, rstd, h1, h2, wnorm, inv_w, e, row1, row2


@triton.jit
def _coupler_net_fwd(POOLED, IW, IB, FC1, ETA, RW, RB, FC2, OW, OB, LAM, C, H, silent, ln_eps, row_eps, eps, LAM_AT,
                     BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    LAM = LAM + LAM_AT
    b = tl.program_id(0).to(tl.int64)
    hh = tl.arange(0, BLOCK_H)
    live_h = hh < H
    _, _, _, _, _, _, _, row1, row2 = _coupler_forward_rows(POOLED, IW, IB, FC1, ETA, RW, RB, C, H, b, hh, live_h,
                                                            silent, ln_eps, row_eps, eps, LAM, False, BLOCK_C,
                                                            BLOCK_H)
    zrow = LAM + b * 2 * C  # z first, then the weights over it
    z_mean = _coupler_z(FC2, zrow, row1[0], row2[0], C, H, hh, live_h, BLOCK_C) / (2 * C)
    tl.debug_barrier()
    _, z_var = _row_moments(zrow, 2 * C, BLOCK_C)
    z_rstd = 1.0 / tl.sqrt(z_var + ln_eps)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        live_c = cc < C
        y1 = (tl.load(zrow + cc, mask=live_c, other=0.0) - z_mean) * z_rstd * tl.load(OW + cc, mask=live_c) \
            + tl.load(OB + cc, mask=live_c)
        y2 = (tl.load(zrow + C + cc, mask=live_c, other=0.0) - z_mean) * z_rstd * tl.load(OW + C + cc, mask=live_c) \
            + tl.load(OB + C + cc, mask=live_c)
        tl.debug_barrier()
        tl.store(zrow + cc, tl.sigmoid(y1 - y2), mask=live_c)
        tl.store(zrow + C + cc, tl.sigmoid(y2 - y1), mask=live_c)


@triton.jit
def _coupler_row_bwd(g_hp, h, live_h, H, inv_w, row, e, row_eps):
    """One hidden row's backward: dL/dh, and the per-row terms d eta, d row_weight, d row_bias, dL/d inv_w
    (per feature) and dL/d inv_x (a scalar)."""
    _, cen, sd, nh, rw, nu, norm_a, inv_x, rho, s = row
    below = rho < e
    expo = tl.exp(tl.minimum(rho - e, 0.0))
    g_scale = g_hp * h
    g_rho = tl.where(below, g_scale * e * expo, g_scale)
    g_eta = tl.where(below, g_scale * expo * (1.0 - e), 0.0)
    g_t = g_rho * nu * (1.0 - nu)
    g_nh = g_t * rw
    d = sd + row_eps
    g_sd = -tl.sum(g_nh * cen, axis=0) / (d * d)
    g_cen = g_nh / d + tl.where(sd > 0, g_sd / (tl.maximum(H - 1, 1) * tl.where(sd > 0, sd, 1.0)), 0.0) * cen
    g_cen = tl.where(live_h, g_cen, 0.0)
    g_h = g_hp * s + g_rho * (inv_w * inv_x) + (g_cen - tl.sum(g_cen, axis=0) / H)
    g_inv_w = g_rho * h * inv_x
    g_inv_x = tl.sum(g_rho * h * inv_w, axis=0)
    return tl.where(live_h, g_h, 0.0), g_eta, g_t * nh, g_t, g_inv_w, g_inv_x


@triton.jit
def _coupler_out_grad(ZROW, GLAM, OW, OB, cc, live_c, C, z_mean, z_rstd):
    """At channels cc: the output LayerNorm's normalised rows zhat_1, zhat_2, its weights for them, and
    dL/d y_1 (= -dL/d y_2) of the softmax over the two rows y_i = zhat_i * w_i + b_i."""
    zh1 = (tl.load(ZROW + cc, mask=live_c, other=0.0) - z_mean) * z_rstd
    zh2 = (tl.load(ZROW + C + cc, mask=live_c, other=0.0) - z_mean) * z_rstd
    ow1 = tl.load(OW + cc, mask=live_c, other=0.0)
    ow2 = tl.load(OW + C + cc, mask=live_c, other=0.0)
    y1 = zh1 * ow1 + tl.load(OB + cc, mask=live_c, other=0.0)
    y2 = zh2 * ow2 + tl.load(OB + C + cc, mask=live_c, other=0.0)
    l1 = tl.sigmoid(y1 - y2)
    g_lam = tl.load(GLAM + cc, mask=live_c, other=0.0) - tl.load(GLAM + C + cc, mask=live_c, other=0.0)
    return zh1, zh2, ow1, ow2, l1 * (1.0 - l1) * g_lam


@triton.jit
def _coupler_work(WORK, B, C, H):
    """The parts of the coupler backward's work buffer after its 8C + H one-dimensional parameter gradients
    (``_coupler_param_grads``): dL/d lam (B, 2C), dL/d pooled (B, 2C), dL/dz^T (C, 2B), a (2B, C), h'
    (2B, H), dL/dh^T (H, 2B) and the per-sample parameter terms (B, 8C + 6H)."""
    GLAM = WORK + 8 * C + H
    GP = GLAM + 2 * B * C
    DZT = GP + 2 * B * C
    A = DZT + 2 * B * C
    HP = A + 2 * B * C
    DHT = HP + 2 * B * H
    PART = DHT + 2 * B * H
    return GLAM, GP, DZT, A, HP, DHT, PART


@triton.jit
def _coupler_param_grads(WORK, FC1, GFC1, GHW, j, B, C, H, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """The weight network's parameter gradients of channel block j, from ``_coupler_net_bwd``'s work: sums
    over the samples of the per-sample terms into WORK's head (in_weight, in_bias (2C), eta (H), out_weight,
    out_bias (2C)), dL/d fc1 (H, C) = dL/dh^T a + k * fc1 into GFC1 and dL/d fc2 (C, H) = dL/dz^T h' into
    GHW's first C rows; block 0 also the row affines' (2, H) each into GHW's last 4 rows."""
    _, _, DZT, A, HP, DHT, PART = _coupler_work(WORK, B, C, H)
    K = 8 * C + 6 * H
    NB = 2 * B
    cc = j * BLOCK_C + tl.arange(0, BLOCK_C)
    live_c = cc < C
    hh = tl.arange(0, BLOCK_H)
    live_h = hh < H
    for quarter in range(0, 8):  # in_weight, in_bias, out_weight, out_bias: C channels of two rows each
        dest = quarter * C + tl.where(quarter >= 4, H, 0)  # (eta's H values sit between in_bias and out_weight)
        tl.store(WORK + dest + cc, _column_sum(PART + quarter * C, B, K, cc, live_c, 16, BLOCK_C), mask=live_c)
    k = _column_sum(PART + 8 * C + 5 * H, B, K, hh, live_h, 16, BLOCK_H)
    live = live_h[:, None] & live_c[None, :]
    g_fc1 = tl.load(FC1 + hh[:, None] * C + cc[None, :], mask=live, other=0.0).to(tl.float32) * k[:, None]
    g_fc2 = tl.zeros([BLOCK_C, BLOCK_H], dtype=tl.float32)
    for n0 in range(0, NB, BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        live_n = nn < NB
        dht = tl.load(DHT + hh[:, None] * NB + nn[None, :], mask=live_h[:, None] & live_n[None, :], other=0.0)
        a = tl.load(A + nn[:, None] * C + cc[None, :], mask=live_n[:, None] & live_c[None, :], other=0.0)
        g_fc1 += tl.dot(dht, a, input_precision="ieee")
        dzt = tl.load(DZT + cc[:, None] * NB + nn[None, :], mask=live_c[:, None] & live_n[None, :], other=0.0)
        hp = tl.load(HP + nn[:, None] * H + hh[None, :], mask=live_n[:, None] & live_h[None, :], other=0.0)
        g_fc2 += tl.dot(dzt, hp, input_precision="ieee")
    tl.store(GFC1 + hh[:, None] * C + cc[None, :], g_fc1, mask=live)
    tl.store(GHW + cc[:, None] * H + hh[None, :], g_fc2, mask=live_c[:, None] & live_h[None, :])
    if j == 0:
        tl.store(WORK + 4 * C + hh, _column_sum(PART + 8 * C, B, K, hh, live_h, 16, BLOCK_H), mask=live_h)
        for row in range(0, 4):  # row_weight's two rows, then row_bias's
            tl.store(GHW + (C + row) * H + hh, _column_sum(PART + 8 * C + (1 + row) * H, B, K, hh, live_h, 16, BLOCK_H),
                     mask=live_h)


@triton.jit
def _coupler_grads_and_params(GRAD, STATE, WORK, GM, GS, FC1, GFC1, GHW, B, R, C, H, P, NRB, LAM_AT,
                              BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                              BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    """Programs (row block < NRB, position block): the branch gradients with dL/d pooled (WORK's GP) spread
    in; programs (NRB + j, 0): the weight network's parameter gradients of channel block j."""
    rb = tl.program_id(0)
    if rb < NRB:
        _, GP, _, _, _, _, _ = _coupler_work(WORK, B, C, H)
        _coupler_branch_grads(GRAD, STATE + LAM_AT, GP, GM, GS, R, C, P, rb, tl.program_id(1), BLOCK_R, BLOCK_P)
    elif tl.program_id(1) == 0:
        _coupler_param_grads(WORK, FC1, GFC1, GHW, rb - NRB, B, C, H, BLOCK_C, BLOCK_H, BLOCK_N)


@triton.jit
def _coupler_net_bwd(POOLED, IW, IB, FC1, ETA, RW, RB, FC2, OW, OB, WORK, C, H, K, silent, ln_eps, row_eps, eps,
                     scale, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program per sample b, reading dL/d lam from WORK and writing the rest of WORK (``_coupler_work``):
    scale * dL/d pooled (GP, used as scratch for z and dL/d a first), h' (HP) and a (A) as rows 2b, 2b + 1
    of (NB = 2B, H) and (NB, C), dL/dz and dL/dh transposed as columns 2b, 2b + 1 of (C, NB) and (H, NB)
    (DZT, DHT), and the sample's parameter-gradient terms (PART row, K values: d in_weight, d in_bias,
    d out_weight, d out_bias (2C each), d eta (H), d row_weight, d row_bias (2H each), and the factor k (H)
    with dL/d fc1 = dh^T a + k * fc1)."""
    b = tl.program_id(0).to(tl.int64)
    NB = 2 * tl.num_programs(0)
    GLAM, GP, DZT, A, HP, DHT, PART = _coupler_work(WORK, tl.num_programs(0), C, H)
    hh = tl.arange(0, BLOCK_H)
    live_h = hh < H
    arow = A + b * 2 * C
    mean, rstd, h1, h2, wnorm, inv_w, e, row1, row2 = _coupler_forward_rows(
        POOLED, IW, IB, FC1, ETA, RW, RB, C, H, b, hh, live_h, silent, ln_eps, row_eps, eps, arow, True,
        BLOCK_C, BLOCK_H)
    tl.store(HP + b * 2 * H + hh, row1[0], mask=live_h)
    tl.store(HP + b * 2 * H + H + hh, row2[0], mask=live_h)
    zrow = GP + b * 2 * C
    glam = GLAM + b * 2 * C
    part = PART + b * K
    z_mean = _coupler_z(FC2, zrow, row1[0], row2[0], C, H, hh, live_h, BLOCK_C) / (2 * C)
    tl.debug_barrier()
    _, z_var = _row_moments(zrow, 2 * C, BLOCK_C)
    z_rstd = 1.0 / tl.sqrt(z_var + ln_eps)
    # the softmax and the output LayerNorm: dL/d zhat and its two sums
    acc1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        live_c = cc < C
        zh1, zh2, ow1, ow2, g_y1 = _coupler_out_grad(zrow, glam, OW, OB, cc, live_c, C, z_mean, z_rstd)
        tl.store(part + 4 * C + cc, g_y1 * zh1, mask=live_c)
        tl.store(part + 5 * C + cc, -g_y1 * zh2, mask=live_c)
        tl.store(part + 6 * C + cc, g_y1, mask=live_c)
        tl.store(part + 7 * C + cc, -g_y1, mask=live_c)
        g_zh1 = g_y1 * ow1
        g_zh2 = -g_y1 * ow2
        acc1 += g_zh1 + g_zh2
        acc2 += g_zh1 * zh1 + g_zh2 * zh2
    m1 = tl.sum(acc1, axis=0) / (2 * C)
    m2 = tl.sum(acc2, axis=0) / (2 * C)
    # dL/dz (to DZ) and dL/dh' = fc2^T dL/dz
    g_hp1 = tl.zeros([BLOCK_H], dtype=tl.float32)
    g_hp2 = tl.zeros([BLOCK_H], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        live_c = cc < C
        zh1, zh2, ow1, ow2, g_y1 = _coupler_out_grad(zrow, glam, OW, OB, cc, live_c, C, z_mean, z_rstd)
        g_z1 = tl.where(live_c, z_rstd * (g_y1 * ow1 - m1 - zh1 * m2), 0.0)
        g_z2 = tl.where(live_c, z_rstd * (-g_y1 * ow2 - m1 - zh2 * m2), 0.0)
        tl.store(DZT + cc * NB + 2 * b, g_z1, mask=live_c)
        tl.store(DZT + cc * NB + 2 * b + 1, g_z2, mask=live_c)
        w = tl.load(FC2 + cc[:, None] * H + hh[None, :], mask=live_c[:, None] & live_h[None, :], other=0.0)
        w = w.to(tl.float32)
        g_hp1 += tl.sum(w * g_z1[:, None], axis=0)
        g_hp2 += tl.sum(w * g_z2[:, None], axis=0)
    # IIEU-B of the hidden rows
    g_h1, g_eta1, g_rw1, g_rb1, g_iw1, g_ix1 = _coupler_row_bwd(g_hp1, h1, live_h, H, inv_w, row1, e, row_eps)
    g_h2, g_eta2, g_rw2, g_rb2, g_iw2, g_ix2 = _coupler_row_bwd(g_hp2, h2, live_h, H, inv_w, row2, e, row_eps)
    tl.store(DHT + hh * NB + 2 * b, g_h1, mask=live_h)
    tl.store(DHT + hh * NB + 2 * b + 1, g_h2, mask=live_h)
    tl.store(part + 8 * C + hh, g_eta1 + g_eta2, mask=live_h)
    tl.store(part + 8 * C + H + hh, g_rw1, mask=live_h)
    tl.store(part + 8 * C + 2 * H + hh, g_rw2, mask=live_h)
    tl.store(part + 8 * C + 3 * H + hh, g_rb1, mask=live_h)
    tl.store(part + 8 * C + 4 * H + hh, g_rb2, mask=live_h)
    k = tl.where(wnorm > 0, -(g_iw1 + g_iw2) * inv_w * inv_w / tl.where(wnorm > 0, wnorm, 1.0), 0.0)
    tl.store(part + 8 * C + 5 * H + hh, k, mask=live_h)
    # dL/d a = fc1^T dL/dh + (dL/d inv_x) d inv_x / d a, then the input LayerNorm
    norm1, ix1 = row1[6], row1[7]
    norm2, ix2 = row2[6], row2[7]
    k1 = tl.where((ix1 > 0) & (norm1 > 0), -g_ix1 * ix1 * ix1 / tl.where(norm1 > 0, norm1, 1.0), 0.0)
    k2 = tl.where((ix2 > 0) & (norm2 > 0), -g_ix2 * ix2 * ix2 / tl.where(norm2 > 0, norm2, 1.0), 0.0)
    prow = POOLED + b * 2 * C
    tl.debug_barrier()
    acc1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        live_c = cc < C
        a1, a2, x1, x2 = _coupler_a(prow, IW, IB, cc, live_c, mean, rstd, C)
        w = tl.load(FC1 + hh[:, None] * C + cc[None, :], mask=live_h[:, None] & live_c[None, :], other=0.0)
        w = w.to(tl.float32)
        g_a1 = tl.sum(w * g_h1[:, None], axis=0) + k1 * a1
        g_a2 = tl.sum(w * g_h2[:, None], axis=0) + k2 * a2
        tl.store(part + cc, g_a1 * x1, mask=live_c)
        tl.store(part + C + cc, g_a2 * x2, mask=live_c)
        tl.store(part + 2 * C + cc, g_a1, mask=live_c)
        tl.store(part + 3 * C + cc, g_a2, mask=live_c)
        g_x1 = tl.where(live_c, g_a1 * tl.load(IW + cc, mask=live_c, other=0.0), 0.0)
        g_x2 = tl.where(live_c, g_a2 * tl.load(IW + C + cc, mask=live_c, other=0.0), 0.0)
        tl.store(zrow + cc, g_x1, mask=live_c)
        tl.store(zrow + C + cc, g_x2, mask=live_c)
        acc1 += g_x1 + g_x2
        acc2 += g_x1 * x1 + g_x2 * x2
    m1 = tl.sum(acc1, axis=0) / (2 * C)
    m2 = tl.sum(acc2, axis=0) / (2 * C)
    tl.debug_barrier()
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        live_c = cc < C
        _, _, x1, x2 = _coupler_a(prow, IW, IB, cc, live_c, mean, rstd, C)
        g_x1 = tl.load(zrow + cc, mask=live_c, other=0.0)
        g_x2 = tl.load(zrow + C + cc, mask=live_c, other=0.0)
        tl.store(zrow + cc, scale * rstd * (g_x1 - m1 - x1 * m2), mask=live_c)
        tl.store(zrow + C + cc, scale * rstd * (g_x2 - m1 - x2 * m2), mask=live_c)


def _coupler_maps(*maps) -> bool:
    """Maps (B, C, *S) or (B, C), contiguous: the coupler's kernels apply (tokens take the composite)."""
    return maps[0].dim() != 3 and all(m.is_contiguous() for m in maps)


def _coupler_rows(x) -> tuple:
    """(R, C, P, BLOCK_R, BLOCK_P) of a map's rows (one per sample and channel) of P positions."""
    b, c = x.shape[:2]
    p = math.prod(x.shape[2:])
    block_p = _pow2(p, 16, 256)
    return b * c, c, p, _pow2(b * c, 1, max(1, _TILE // block_p)), block_p


def _weights(*tensors) -> bool:
    """(B, 2, C) or (B, 2C) per-channel terms as the kernels read them: contiguous float32."""
    return all(t.is_contiguous() and t.dtype == torch.float32 for t in tensors)


def coupler_pool(main, shortcut):
    if not _coupler_maps(main, shortcut):
        return composite.coupler_pool(main, shortcut)
    r, c, p, block_r, block_p = _coupler_rows(main)
    pooled = main.new_empty(main.shape[0], 2 * c, dtype=torch.float32)
    _coupler_pool[(triton.cdiv(r, block_r),)](main, shortcut, pooled, r, c, p, BLOCK_R=block_r, BLOCK_P=block_p)
    return pooled


def coupler_forward(main, shortcut, lam):
    if not (_coupler_maps(main, shortcut) and _weights(lam)):
        return composite.coupler_forward(main, shortcut, lam)
    r, c, p, block_r, block_p = _coupler_rows(main)
    out = torch.empty_like(main)
    _coupler_fuse[(triton.cdiv(r, block_r), triton.cdiv(p, block_p))](main, shortcut, lam, out, r, c, p, 0,
                                                                       BLOCK_R=block_r, BLOCK_P=block_p)
    return out


def coupler_weight_grads(grad, out, shortcut, lam):
    if not (_coupler_maps(grad, out, shortcut) and _weights(lam)):
        return composite.coupler_weight_grads(grad, out, shortcut, lam)
    r, c, p, block_r, block_p = _coupler_rows(grad)
    grad_lam = torch.empty_like(lam)
    _coupler_weight_grads[(triton.cdiv(r, block_r),)](grad, out, shortcut, lam, grad_lam, r, c, p, 0, 0,
                                                      BLOCK_R=block_r, BLOCK_P=block_p)
    return grad_lam


def coupler_grads(grad, lam, add):
    if not (_coupler_maps(grad) and _weights(lam, add)):
        return composite.coupler_grads(grad, lam, add)
    r, c, p, block_r, block_p = _coupler_rows(grad)
    grad_main, grad_shortcut = torch.empty_like(grad), torch.empty_like(grad)
    _coupler_grads[(triton.cdiv(r, block_r), triton.cdiv(p, block_p))](grad, lam, add, grad_main, grad_shortcut, r, c,
                                                                        p, 0, 0, BLOCK_R=block_r, BLOCK_P=block_p)
    return grad_main, grad_shortcut


_NET_HIDDEN = 256  # widest hidden layer the one-program-per-sample kernels take


def _net_blocks(net) -> tuple[int, int] | None:
    """(BLOCK_C, BLOCK_H) of the weight network's kernels, or None where they do not apply."""
    fits = net.hidden <= _NET_HIDDEN and all(t.is_contiguous() and t.dtype != torch.float64 for t in net.tensors())
    if not fits:
        return None
    block_h = _pow2(net.hidden, 2, _NET_HIDDEN)
    return _pow2(net.channels, 16, max(16, _TILE // block_h)), block_h


def _net_scalars(net) -> tuple:
    return net.channels, net.hidden, net.silent, net.ln_eps, net.row_eps, net.eps


def coupler_weights(pooled, net):
    blocks = _net_blocks(net)
    if blocks is None or not pooled.is_contiguous() or pooled.dtype != torch.float32:
        return composite.coupler_weights(pooled, net)
    lam = pooled.new_empty(pooled.shape[0], 2, net.channels)
    _coupler_net_fwd[(pooled.shape[0],)](pooled, *net.tensors(), lam, *_net_scalars(net), 0, BLOCK_C=blocks[0],
                                         BLOCK_H=blocks[1])
    return lam


def _coupler_work_numel(b: int, c: int, h: int) -> int:
    """The length of the coupler backward's work buffer (``_coupler_work``)."""
    return 8 * c + h + 8 * b * c + 4 * b * h + b * (8 * c + 6 * h)


def coupler_weights_backward(pooled, net, grad_lam, scale: float):
    blocks = _net_blocks(net)
    if blocks is None or not pooled.is_contiguous() or pooled.dtype != torch.float32:
        return composite.coupler_weights_backward(pooled, net, grad_lam, scale)
    b, c, h = pooled.shape[0], net.channels, net.hidden
    work = pooled.new_empty(_coupler_work_numel(b, c, h))
    work[8 * c + h:8 * c + h + 2 * b * c] = grad_lam.reshape(-1)
    _coupler_net_bwd[(b,)](pooled, *net.tensors(), work, c, h, 8 * c + 6 * h, *_net_scalars(net)[2:], scale,
                           BLOCK_C=blocks[0], BLOCK_H=blocks[1])
    grads = _coupler_param_buffers(work, net)
    block_c, block_h, block_n = _param_blocks(c, h)
    _coupler_grads_and_params[(triton.cdiv(c, block_c), 1)](work, work, work, work, work, net.fc1, grads[2], grads[6],
                                                            b, 0, c, h, 1, 0, 0, BLOCK_R=1, BLOCK_P=16,
                                                            BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_N=block_n)
    start = 8 * c + h + 2 * b * c
    return work[start:start + 2 * b * c].view(b, 2 * c), _in_dtypes(grads, net)


def _coupler_param_buffers(work, net) -> tuple:
    """The weight network's gradients in ``net.tensors()`` order: the head of the work buffer split into the
    one-dimensional ones, a (C + 4, H) buffer split into fc2's and the row affines', and fc1's (H, C)."""
    c, h = net.channels, net.hidden
    g_in_w, g_in_b, g_eta, g_out_w, g_out_b, _ = work.split([2 * c, 2 * c, h, 2 * c, 2 * c, work.numel() - 8 * c - h])
    g_fc2, g_rw, g_rb = work.new_empty(c + 4, h).split([c, 2, 2])
    g_fc1 = work.new_empty(h, c)
    return g_in_w, g_in_b, g_fc1, g_eta, g_rw, g_rb, g_fc2, g_out_w, g_out_b


def _param_blocks(c: int, h: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_H, BLOCK_N) of the parameter-gradient programs: channel blocks of fc1^T / fc2 tiles."""
    block_h = _pow2(h, 16, _NET_HIDDEN)
    return _pow2(c, 16, max(16, 2048 // block_h)), block_h, 16


def _in_dtypes(grads, net) -> tuple:
    return tuple(g if g.dtype == t.dtype else g.to(t.dtype) for g, t in zip(grads, net.tensors()))


def coupler_fusion(main, shortcut, net):
    """As composite.coupler_fusion: the pooling, the weight network and the fusion in three launches, the
    pooled branches and the weights in one buffer."""
    blocks = _net_blocks(net)
    if blocks is None or not _coupler_maps(main, shortcut):
        return composite.coupler_fusion(main, shortcut, net, pool=coupler_pool, weights=coupler_weights,
                                        forward=coupler_forward)
    r, c, p, block_r, block_p = _coupler_rows(main)
    b = main.shape[0]
    state = main.new_empty(4 * b * c, dtype=torch.float32)
    _coupler_pool[(triton.cdiv(r, block_r),)](main, shortcut, state, r, c, p, BLOCK_R=block_r, BLOCK_P=block_p)
    _coupler_net_fwd[(b,)](state, *net.tensors(), state, *_net_scalars(net), 2 * b * c, BLOCK_C=blocks[0],
                           BLOCK_H=blocks[1])
    out = torch.empty_like(main)
    _coupler_fuse[(triton.cdiv(r, block_r), triton.cdiv(p, block_p))](main, shortcut, state, out, r, c, p, 2 * b * c,
                                                                       BLOCK_R=block_r, BLOCK_P=block_p)
    return out, state


def coupler_fusion_backward(grad, out, shortcut, state, net):
    """As composite.coupler_fusion_backward in three launches: the sums over positions, the weight network's
    backward per sample, then the branch gradients with the parameter gradients' programs in the same
    launch. The small intermediates and the one-dimensional parameter gradients share one buffer."""
    blocks = _net_blocks(net)
    if blocks is None or not _coupler_maps(grad, out, shortcut) or state.dtype != torch.float32:
        return composite.coupler_fusion_backward(grad, out, shortcut, state, net, weight_grads=coupler_weight_grads,
                                                 weights_backward=coupler_weights_backward, grads=coupler_grads)
    r, c, p, block_r, block_p = _coupler_rows(grad)
    b, h = grad.shape[0], net.hidden
    work = state.new_empty(_coupler_work_numel(b, c, h))
    grads = _coupler_param_buffers(work, net)
    lam_at = 2 * b * c
    _coupler_weight_grads[(triton.cdiv(r, block_r),)](grad, out, shortcut, state, work, r, c, p, lam_at, 8 * c + h,
                                                      BLOCK_R=block_r, BLOCK_P=block_p)
    _coupler_net_bwd[(b,)](state, *net.tensors(), work, c, h, 8 * c + 6 * h, *_net_scalars(net)[2:], 1.0 / p,
                           BLOCK_C=blocks[0], BLOCK_H=blocks[1])
    grad_main, grad_shortcut = torch.empty_like(grad), torch.empty_like(grad)
    block_c, block_h, block_n = _param_blocks(c, h)
    nrb = triton.cdiv(r, block_r)
    _coupler_grads_and_params[(nrb + triton.cdiv(c, block_c), triton.cdiv(p, block_p))](
        grad, state, work, grad_main, grad_shortcut, net.fc1, grads[2], grads[6], b, r, c, h, p, nrb, lam_at,
        BLOCK_R=block_r, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_N=block_n)
    return grad_main, grad_shortcut, _in_dtypes(grads, net)
