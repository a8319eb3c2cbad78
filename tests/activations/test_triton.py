"""The Triton kernels against the composite reference, on the geometries the C++ kernels are tested on.

Without a GPU they run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set in
conftest.py); on a GPU machine the same tests run the compiled kernels on CUDA tensors.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn

from actlab.activations import IIEUB, kernels
from actlab.activations.kernels import composite

triton_kernels = pytest.importorskip("actlab.activations.kernels.triton_kernels", reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []  # part of `pytest -m gpu` on a GPU machine
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and Triton's interpreter is off", allow_module_level=True)


def close(got, want, dtype=torch.float32):
    if want.dtype == torch.uint8:
        assert torch.equal(got, want)
        return
    scale = max(want.float().abs().max().item(), 1.0)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 maps: one rounding of the output
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * scale)


def iieu_inputs(layout, dims, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "planes":
        b, c, groups, p = dims
        x, inv, nu = torch.randn(b, c, p, generator=g), torch.rand(b, groups, p, generator=g) + 0.2, torch.rand(b, c, generator=g)
        inv[0, :, :3] = 0  # silenced patches
    else:
        s, t, c = dims
        x, inv, nu = torch.randn(s * t, c, generator=g), torch.rand(s * t, generator=g) + 0.2, torch.rand(s, c, generator=g)
        inv[:2] = 0
    inv_w, eta = torch.rand(c, generator=g) + 0.5, torch.rand(c, generator=g) * 0.8  # both adjuster branches
    tensors = [t.to(DEVICE) for t in (x.to(dtype), inv, inv_w, nu, eta)]
    return tensors, torch.randn(x.shape, generator=g).to(DEVICE, dtype)


IIEU_GEOMETRIES = [  # planes (B, C, G, P) with tails after 16-wide blocks; rows (S, T, C)
    ("planes", (2, 8, 2, 37)), ("planes", (3, 6, 1, 5)), ("planes", (2, 8, 8, 20)),  # grouped, dense, depthwise
    ("planes", (2, 40, 1, 300)),  # several channel and position tiles per group, both with tails
    ("rows", (2, 5, 11)), ("rows", (4, 1, 200)), ("rows", (1, 37, 16)),  # tokens, per-row nu, batch 1
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout,dims", IIEU_GEOMETRIES)
def test_iieu_forward_and_backward(layout, dims, dtype):
    (x, inv, inv_w, nu, eta), go = iieu_inputs(layout, dims, dtype)
    close(triton_kernels.iieu_forward(x, inv, inv_w, nu, eta), composite.iieu_forward(x, inv, inv_w, nu, eta), dtype)
    got = triton_kernels.iieu_backward(go, x, inv, inv_w, nu, eta)
    want = composite.iieu_backward(go, x, inv, inv_w, nu, eta)
    close(got[0], want[0], dtype)
    for a, b in zip(got[1:], want[1:]):  # float32 sums, whatever the map dtype
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(b.abs().max().item(), 1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,groups", [((2, 6, 5, 7), 1), ((3, 40, 20, 15), 2), ((2, 8, 4, 4), 8)],
                         ids=["dense", "tiles", "depthwise"])
def test_channel_sums_and_scales(shape, groups, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    close(triton_kernels.channel_sumsq(x, groups, torch.float32), composite.channel_sumsq(x, groups, torch.float32))
    scale = torch.randn(shape[0], groups, *shape[2:], generator=g).to(DEVICE)
    got, want = triton_kernels.channel_scale(x, scale), composite.channel_scale(x, scale)
    assert got.dtype == x.dtype
    close(got, want, dtype)
    add = torch.randn(shape, generator=g).to(DEVICE, dtype)
    fresh = triton_kernels.channel_scale(x, scale, add)
    close(fresh, composite.channel_scale(x, scale, add), dtype)
    kept = add.clone()
    into = triton_kernels.channel_scale(x, scale, add, into_add=True)  # one pass, written over the addend
    assert into.data_ptr() == add.data_ptr() and torch.equal(into, fresh) and not torch.equal(add, kept)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,offset", [((4, 3, 37), 0.0), ((2, 5, 1100), 1000.0), ((3, 4, 1), 0.5)],
                         ids=["tail", "far_from_zero", "one_position"])
def test_batch_moments_read_the_map_in_its_own_dtype(shape, offset, dtype):
    """Per-plane means and per-channel mean and biased variance (float64) from one pass over the map in
    its dtype; a map far from zero (mean 1000, spread 1) keeps its variance."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(shape, generator=g) + offset).to(DEVICE, dtype)
    xd = x.double().flatten(2)
    want = (xd.mean(2), xd.mean((0, 2)), xd.var((0, 2), correction=0))
    got = triton_kernels.batch_moments(x)
    for a, b in zip(got, want):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def bn_terms(c_channels, g):
    """Per-channel x_t = c * xs + xb and xhat = c * hs + hb coefficients, as a BatchNorm's replay gives them."""
    hs = torch.rand(c_channels, generator=g) + 0.5
    hb = torch.randn(c_channels, generator=g) * 0.3
    gamma, beta = torch.rand(c_channels, generator=g) + 0.5, torch.randn(c_channels, generator=g) * 0.2
    return [t.to(DEVICE) for t in (hs * gamma, hb * gamma + beta, hs, hb)]


@pytest.mark.parametrize("silent", [-1.0, 0.3])
def test_inverse_norms_and_their_gradient(silent):
    g = torch.Generator().manual_seed(5)
    sumsq = torch.rand(3, 2, 9, 11, generator=g) * 4
    sumsq[0, 0, :2] = 0  # zero patches: inv 1 / eps, gradient 0
    sumsq[1, 1, :3] = 0.01  # below the silent norm 0.3 when silencing
    sumsq, grad_inv = sumsq.to(DEVICE), torch.randn(sumsq.shape, generator=g).to(DEVICE)
    close(triton_kernels.inverse_norm(sumsq, 1e-5, silent), composite.inverse_norm(sumsq, 1e-5, silent))
    got = triton_kernels.inv_norm_grad_sumsq(sumsq, grad_inv, 1e-5, silent)
    want = composite.inv_norm_grad_sumsq(sumsq, grad_inv, 1e-5, silent)
    assert torch.equal(got == 0, want == 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("gather", [True, False], ids=["memory", "rows"])
@pytest.mark.parametrize("tau", [0.0, 0.3])
def test_dpa_mask(gather, tau):
    g = torch.Generator().manual_seed(4)
    b, c, k = 6, 37, 5
    v = torch.randn(b, c, generator=g).to(DEVICE)
    value = torch.randn(k if gather else b, c, generator=g).to(DEVICE)
    grad_memory = torch.randn(k, c, generator=g).to(DEVICE)
    labels = torch.tensor([0, 4, 4, 2, 0, 1], device=DEVICE)
    got = triton_kernels.dpa_mask(v, value, grad_memory, labels, tau, gather)
    want = composite.dpa_mask(v, value, grad_memory, labels, tau, gather)
    assert got.dtype == torch.bool and 0 < int(want.sum()) < want.numel()
    assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(37, 7), (37, 1, 7, 1)], ids=["rows", "filters"])  # filters: rows as they are
@pytest.mark.parametrize("silent", [-1.0, 1e-6 * 7 ** 0.5], ids=["published", "silence"])
def test_rows_inverse_norms(silent, shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 7, generator=g)
    x[0] = 0
    x[1] *= 0.8e-6 * 7 ** 0.5 / x[1].norm()  # just below the silencing norm
    x[2] *= 1.25e-6 * 7 ** 0.5 / x[2].norm()  # just above
    x = x.reshape(shape).to(DEVICE)
    inv, sumsq = triton_kernels.rows_inv_norm(x, 1e-8, silent)
    want_inv, want_sumsq = composite.rows_inv_norm(x, 1e-8, silent)
    close(inv, want_inv)
    close(sumsq, want_sumsq)
    grad_inv = torch.randn(37, generator=g).to(DEVICE)
    want = composite.rows_inv_norm_backward(x, want_sumsq, grad_inv, 1e-8, silent)
    close(triton_kernels.rows_inv_norm_backward(x, want_sumsq, grad_inv, 1e-8, silent), want)
    add = torch.randn(x.shape, generator=g).to(DEVICE)
    with_add = want + add
    close(triton_kernels.rows_norm_grad_scale(x, want_sumsq, grad_inv, 1e-8, silent, add), with_add)
    into = triton_kernels.rows_norm_grad_scale(x, want_sumsq, grad_inv, 1e-8, silent, add, into_add=True)
    assert into.data_ptr() == add.data_ptr()
    close(into, with_add)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tau", [0.0, 0.25])
@pytest.mark.parametrize("tokens,shape", [(False, (2, 3, 13)), (True, (2, 5, 19)), (False, (1, 2, 1100))],
                         ids=["maps", "tokens", "long_maps"])
def test_tau_pool_forward_and_backward(tokens, shape, tau, dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g)
    x[0, 0, :3] = tau  # exact ties: their gradient passes
    x = x.to(DEVICE, dtype)
    got, want = triton_kernels.tau_pool(x, tau, tokens), composite.tau_pool(x, tau, tokens)
    for a, b in zip(got, want):
        close(a, b, dtype)
    passes = want[2]
    assert torch.equal(got[2], passes)
    assert torch.equal(triton_kernels.pass_mask(x, tau), passes)
    grad_out = torch.randn(shape, generator=g).to(DEVICE, dtype)
    grad_v = torch.randn(shape[0], shape[2] if tokens else shape[1], generator=g).to(DEVICE)
    beside = torch.cat([torch.randn(shape[0], 3, generator=g).to(DEVICE), grad_v], 1)[:, 3:]  # strided rows
    for gv in (grad_v, beside, None):
        got_grad = triton_kernels.tau_pool_backward(grad_out, passes, gv, tokens)
        close(got_grad, composite.tau_pool_backward(grad_out, passes, gv, tokens), dtype)
    assert torch.equal(got_grad[0, 0, :3], grad_out[0, 0, :3])  # the ties' gradient passed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens,shape,cls", [(False, (3, 5, 7, 7), False), (False, (2, 4, 13), False),
                                              (False, (1, 3, 1100), False), (True, (3, 5, 24), False),
                                              (True, (3, 5, 24), True), (True, (2, 3, 19), False)],
                         ids=["maps_7x7", "maps_13", "long_maps", "tokens", "class_token", "tokens_odd_channels"])
def test_dpa_forward_one_launch_matches_composite(tokens, shape, cls, dtype):
    """TAU, the pooled values, the packed pass bits, the channel mask and the count in one kernel: planes
    that share bytes of the pass mask (7x7, 13 positions), channel counts not a multiple of 8, a class
    token's values for v; and the backward that spreads v's gradient back."""
    g = torch.Generator().manual_seed(5)
    b, c = (shape[0], shape[2]) if tokens else shape[:2]
    x = (torch.randn(shape, generator=g) + 0.3).to(DEVICE, dtype)
    memories = tuple((torch.randn(4, c, generator=g) - 0.7).to(DEVICE) for _ in range(2))  # mostly below: hits
    labels = torch.tensor([3, 0, 3][:b], device=DEVICE)
    count = torch.zeros((), dtype=torch.long, device=DEVICE)
    got = triton_kernels.dpa_forward(x, 0.1, tokens, memories, labels, (count, 3), cls)
    flat = x if tokens else x.flatten(2)
    want = composite.tau_pool(flat, 0.1, tokens)
    v = x[:, 0].float() if cls else want[1]
    close(got[0], want[0].view(shape), dtype)
    close(got[1], v)
    assert torch.equal(got[2], want[2]) and int(count) == 3
    mask = composite.dpa_mask(v, *memories, labels, 0.1, True)
    assert got[3].dtype == torch.bool and 0 < int(mask.sum()) < mask.numel()
    assert torch.equal(got[3], mask)
    plain = triton_kernels.dpa_forward(x, 0.1, tokens, cls=cls)
    assert plain[3] is None and torch.equal(plain[2], want[2])
    grad_out, grad_v = torch.randn(shape, generator=g).to(DEVICE, dtype), torch.randn(b, c, generator=g).to(DEVICE)
    expected = composite.masked_grad(grad_out, want[2]).float()
    if cls:
        expected[:, 0] += grad_v
    elif tokens:
        expected += grad_v[:, None] / shape[1]
    else:
        expected += (grad_v / flat.shape[2]).view(b, c, *([1] * (len(shape) - 2)))
    close(triton_kernels.tau_pool_backward(grad_out, want[2], grad_v, tokens, cls), expected.to(dtype), dtype)
    close(composite.tau_pool_backward(grad_out, want[2], grad_v, tokens, cls), expected.to(dtype), dtype)


def sequential_rule(memory, labels, values, alpha, signs=False):
    """The memory rule one sample at a time; a sample with a non-finite value is skipped."""
    memory, rows = memory.clone(), []
    for i in range(len(labels)):
        k, v = int(labels[i]), values[i]
        if bool(torch.isfinite(v).all()):
            v = torch.where(v > 0, 1.0, -1.0) if signs else v
            memory[k] = memory[k] + alpha * (v - memory[k])
        rows.append(memory[k].clone())
    return memory, torch.stack(rows)


@pytest.mark.parametrize("signs", [False, True], ids=["values", "signs"])
@pytest.mark.parametrize("classes,batch,channels", [(3, 40, 5), (1, 17, 33), pytest.param(50, 64, 300, marks=pytest.mark.slow),
                                                   (2, 1, 4)])
def test_memory_update_scan_follows_the_sample_by_sample_rule(classes, batch, channels, signs):
    g = torch.Generator().manual_seed(batch)
    memory = torch.randn(classes, channels, generator=g)
    labels = torch.randint(0, classes, (batch,), generator=g)
    values = torch.randn(batch, channels, generator=g)
    if batch > 5:
        values[3, 1], values[5, 0] = float("nan"), float("inf")  # skipped samples
    want_memory, want_rows = sequential_rule(memory, labels, values, 0.9, signs)
    memory, labels, values = memory.to(DEVICE), labels.to(DEVICE), values.to(DEVICE)
    rows = triton_kernels.ema_update_(memory, labels, values, 0.9, torch.sort(labels, stable=True), signs)
    torch.testing.assert_close(memory.cpu(), want_memory, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows.cpu(), want_rows, rtol=1e-5, atol=1e-5)
    for flag in (False, True):  # decided on the device: off, nothing changes and the rows are the memory's
        kept = want_memory.clone().to(DEVICE)
        rows = triton_kernels.ema_update_(kept, labels, values, 0.9, None, signs,
                                          enabled=torch.tensor(flag, device=DEVICE))
        if not flag:
            assert torch.equal(kept.cpu(), want_memory) and torch.equal(rows, kept[labels])
    again = want_memory.clone().to(DEVICE)
    assert triton_kernels.ema_update_(again, labels, values, 0.9, None, signs, after=False) is None
    twice = sequential_rule(want_memory, labels.cpu(), values.cpu(), 0.9, signs)[0]
    torch.testing.assert_close(again.cpu(), twice, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kept.cpu(), twice, rtol=1e-5, atol=1e-5)  # the enabled call


@pytest.fixture
def triton_mode():
    kernels.set_kernels("triton")
    yield
    kernels.set_kernels(os.environ.get("ACTLAB_KERNELS", "auto"))


@pytest.mark.parametrize("site", ["conv", "linear"])
def test_iieu_unit_on_triton_matches_composite(site, triton_mode):
    """A whole IIEU-B unit (eager training path) dispatching to Triton gives the composite's results."""
    torch.manual_seed(0)
    producer = nn.Conv2d(4, 6, 3, padding=1) if site == "conv" else nn.Linear(4, 6)
    x = torch.randn((2, 4, 5, 5) if site == "conv" else (2, 3, 4))
    unit = IIEUB(6, producer=producer)
    producer, unit, x = producer.to(DEVICE), unit.to(DEVICE), x.to(DEVICE)
    with torch.no_grad():
        unit.eta.uniform_(0.2, 0.8)
    results = []
    for mode in ("triton", "eager"):
        kernels.set_kernels(mode)
        xs = x.clone().requires_grad_()
        out = unit(producer(xs))
        grads = torch.autograd.grad((out * torch.linspace(-1, 2, out.numel(), device=DEVICE).view_as(out)).sum(),
                                    [xs, unit.eta, producer.weight])
        results.append((out, *grads))
    for a, b in zip(*results):
        close(a, b)


@pytest.mark.parametrize("c", [7, 1100], ids=["narrow", "blocks"])
def test_term_b_forward(c):
    """nu = sigmoid(LayerNorm(gap) * weight + bias) per sample, with the LayerNorm's statistics."""
    g = torch.Generator().manual_seed(15)
    gap = (torch.randn(3, c, generator=g) * 2 + 5).to(DEVICE)
    weight, bias = (torch.rand(c, generator=g) + 0.5).to(DEVICE), (torch.randn(c, generator=g) * 0.1).to(DEVICE)
    got, want = triton_kernels.term_b_forward(gap, weight, bias, 1e-6), composite.term_b_forward(gap, weight, bias, 1e-6)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ref = torch.sigmoid(torch.nn.functional.layer_norm(gap.double(), (c,), weight.double(), bias.double(), 1e-6))
    torch.testing.assert_close(got[0].double(), ref, rtol=1e-5, atol=1e-6)


def term_b_inputs(b, c, g):
    """term-B's LayerNorm input gap (B, C), statistics (B, 1) and weight, and its output nu."""
    gap = torch.randn(b, c, generator=g)
    weight, bias = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.1
    z, mean, rstd = torch.native_layer_norm(gap, (c,), weight, bias, 1e-6)
    return torch.sigmoid(z).to(DEVICE), [t.to(DEVICE) for t in (gap, mean, rstd, weight)]


def site_stats(b, c, g, inv_w):
    """A conv-BN site's statistics as ``composite.site_stats_parts`` reads them: BatchNorm coefficients,
    GAP, term-B's nu and its LayerNorm's mean and rstd, the filters' inverse and squared norms."""
    nu, (gap, mean, rstd, weight) = term_b_inputs(b, c, g)
    parts = (*bn_terms(c, g), gap, nu, mean, rstd, inv_w, (1 / inv_w).square())
    return torch.cat([t.reshape(-1) for t in parts]), weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch_stats", "running_stats"])
@pytest.mark.parametrize("dims", [(2, 8, 2, 37), (2, 40, 1, 300), (3, 6, 6, 5)], ids=["grouped", "tiles", "depthwise"])
def test_conv_bn_site_forward_and_backward(dims, batch_stats, dtype):
    """The unit's output from the site's statistics, and the four launches of the backward through the
    BatchNorm and term-B, against the composite's composition of its two passes with per-channel torch
    arithmetic: dL/dc, the unit's, the BatchNorm's and the LayerNorm's gradients."""
    check_bn_site(dims, batch_stats, dtype)


@pytest.mark.slow
def test_conv_bn_site_over_batch_tiles():
    """A batch of more than one tile (128 samples) in the per-channel launch."""
    check_bn_site((130, 2, 1, 1), True, torch.float32)


def check_bn_site(dims, batch_stats, dtype):
    (c, inv, inv_w, _, eta), go = iieu_inputs("planes", dims, dtype, seed=5)
    stats, ln_weight = site_stats(dims[0], dims[1], torch.Generator().manual_seed(12), inv_w)
    close(triton_kernels.bn_site_forward(c, inv, eta, stats), composite.bn_site_forward(c, inv, eta, stats), dtype)
    got = triton_kernels.bn_site_backward(go, c, inv, eta, stats, ln_weight, batch_stats)
    # the reference in float64: the float32 composite loses ~1e-5 of dL/dc to cancellation over large batches
    want = composite.bn_site_backward(*(t.double() for t in (go, c, inv, eta, stats, ln_weight)), batch_stats)
    assert got.c.dtype == c.dtype and got.c.shape == c.shape
    close(got.c, want.c, dtype)
    assert got.nu is None and want.nu is None  # term-B's nu is inside the unit
    for a, b in zip(got[1:], want[1:]):
        if b is not None:
            assert a.shape == b.shape
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * max(b.abs().max().item(), 1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("shape", [(3, 5, 6, 7), (130, 2, 1, 1)], ids=["maps", "batch_tiles"])
def test_conv_bn_site_statistics(shape, affine, dtype):
    """The site's statistics in three launches (moments, BatchNorm coefficients with GAP, term-B) into one
    buffer, against the composite's BatchNorm terms and LayerNorm."""
    g = torch.Generator().manual_seed(3)
    c = (torch.randn(shape, generator=g) * 2 + 5).to(DEVICE, dtype)
    ch = shape[1]
    weight, bias = (torch.rand(ch, generator=g).to(DEVICE) + 0.5, torch.randn(ch, generator=g).to(DEVICE)) if affine \
        else (None, None)
    ln_weight, ln_bias = torch.rand(ch, generator=g).to(DEVICE) + 0.5, torch.randn(ch, generator=g).to(DEVICE) * 0.1
    filters = torch.randn(ch, 3, 3, 3, generator=g).to(DEVICE)
    filters[0] = 0  # an all-zero filter: inv_w = 1 / eps, no gradient
    got = triton_kernels.bn_site_stats(c, weight, bias, 1e-5, None, ln_weight, ln_bias, 1e-6, filters, 1e-3)
    want = composite.bn_site_stats(c, weight, bias, 1e-5, None, ln_weight, ln_bias, 1e-6, filters, 1e-3)
    n = composite.site_stats_numel(shape[0], ch)
    assert got.dtype == torch.float32 and got.numel() == want.numel() == n
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    grad_inv_w = torch.randn(ch, generator=g).to(DEVICE)
    grad = triton_kernels.bn_site_filter_grad(filters, got, grad_inv_w, 1e-3)
    torch.testing.assert_close(grad, composite.bn_site_filter_grad(filters, want, grad_inv_w, 1e-3))
    assert grad.shape == filters.shape and not grad[0].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("shape", [(3, 5, 6, 7), (130, 2, 1, 1)], ids=["maps", "batch_tiles"])
def test_batchnorm_terms(shape, affine, dtype):
    """A training BatchNorm's output and its GAP from the per-channel coefficients of one pass over c."""
    g = torch.Generator().manual_seed(13)
    norm = nn.BatchNorm2d(shape[1], eps=1e-3, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.uniform_(-1.0, 1.0)
    c = (torch.randn(shape, generator=g) * 4 + 2).to(dtype)
    x_t = copy.deepcopy(norm).double()(c.double())
    norm = norm.to(DEVICE)
    xs, xb, hs, hb, gap = triton_kernels.batchnorm_terms(c.to(DEVICE), norm.weight, norm.bias, norm.eps)
    view = (1, -1, 1, 1)
    cd = c.double()
    torch.testing.assert_close((cd * xs.cpu().double().view(view) + xb.cpu().double().view(view)), x_t.detach(),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close((cd * hs.cpu().double().view(view) + hb.cpu().double().view(view)) *
                               (norm.weight.detach().cpu().double().view(view) if affine else 1) +
                               (norm.bias.detach().cpu().double().view(view) if affine else 0),
                               x_t.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gap.cpu().double(), x_t.detach().mean((2, 3)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("silent", [-1.0, 0.5], ids=["published", "silence"])
@pytest.mark.parametrize("conv", [
    dict(kernel_size=3, padding=1), dict(kernel_size=3, padding=1, stride=2),
    dict(kernel_size=3, padding=2, dilation=2), dict(kernel_size=(5, 3), padding="same"), dict(kernel_size=1, stride=2), dict(kernel_size=4, stride=3),
    dict(kernel_size=3, padding=1, groups=2)], ids=["3x3", "stride2", "dilation2", "same_5x3", "pointwise_stride2",
                                                   "no_pad_stride3", "grouped"])
def test_window_inverse_norms_and_their_adjoint(conv, silent):
    """Patch norms summed over each receptive field in the kernel (padding, stride, dilation, groups) and
    the factor of their gradient (the window sum's adjoint), against the convolution-based composite."""
    from actlab.activations.iieu import ConvPatches

    patches = ConvPatches.from_conv(nn.Conv2d(4, 6, **conv))
    g = torch.Generator().manual_seed(14)
    sq = torch.rand(2, patches.groups, 11, 9, generator=g)
    sq[0, 0, :4, :4] = 0  # zero and silenced norms
    sq = sq.to(DEVICE)
    inv, sumsq = triton_kernels.window_inv_norm(sq, patches, 1e-5, silent)
    want_inv, want_sumsq = composite.window_inv_norm(sq, patches, 1e-5, silent)
    close(sumsq, want_sumsq)
    close(inv, want_inv)
    assert torch.equal(inv == 0, want_inv == 0)
    grad_inv = torch.randn(want_inv.shape, generator=g).to(DEVICE)
    got = triton_kernels.window_inv_norm_backward(want_sumsq, grad_inv, (11, 9), patches, 1e-5, silent)
    want = composite.window_inv_norm_backward(want_sumsq, grad_inv, (11, 9), patches, 1e-5, silent)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("groups", [1, 2])
def test_per_position_patch_norms_in_one_pass_each_way(groups, dtype):
    """A 1x1 stride-1 producer's patch norms: the sums of squares and inverse norms in one launch, and the
    gradient factor formed in the pass that scales x_pre (into its other gradient, in place)."""
    g = torch.Generator().manual_seed(16)
    x = torch.randn(2, 6, 5, 7, generator=g)
    x[0, :, 0, :3] = 0  # zero patches: inverse 1 / eps, gradient 0
    x = x.to(DEVICE, dtype)
    got = triton_kernels.channel_inv_norm(x, groups, torch.float32, 1e-5, 0.3)
    want = composite.channel_inv_norm(x, groups, torch.float32, 1e-5, 0.3)
    for a, b in zip(got, want):
        close(a, b)
    sumsq, grad_inv = want[1], torch.randn(want[1].shape, generator=g).to(DEVICE)
    add = torch.randn(x.shape, generator=g).to(DEVICE, dtype)
    want = composite.channel_norm_grad_scale(x, sumsq, grad_inv, 1e-5, 0.3, add)
    close(triton_kernels.channel_norm_grad_scale(x, sumsq, grad_inv, 1e-5, 0.3), want - add, dtype)
    into = triton_kernels.channel_norm_grad_scale(x, sumsq, grad_inv, 1e-5, 0.3, add, into_add=True)
    assert into.data_ptr() == add.data_ptr()
    close(into, want, dtype)


def coupler_net(channels, reduction, seed=0):
    """A Dynamic Coupler moved away from its initial values (uneven fusion weights, both adjuster branches)."""
    from actlab import DynamicCoupler

    torch.manual_seed(seed)
    dc = DynamicCoupler(channels, reduction)
    with torch.no_grad():
        for p in (dc.out_norm.weight, dc.act.norm_weight, dc.in_norm.weight):
            p.uniform_(0.5, 2.0)
        for p in (dc.in_norm.bias, dc.out_norm.bias, dc.act.norm_bias):
            p.normal_(0, 0.3)
        dc.act.eta.uniform_(0.2, 1.0)
    return dc.to(DEVICE)


@pytest.mark.parametrize("channels,reduction", [(32, 4), (48, 16), (8, 8), pytest.param(300, 2, marks=pytest.mark.slow)],
                         ids=["hidden8", "hidden3", "hidden1", "hidden150_tiles"])
def test_coupler_weight_network_in_one_launch_each_way(channels, reduction):
    """The weight network (input LayerNorm, fc1, IIEU-B with the row normaliser, fc2, output LayerNorm,
    softmax) forward and backward against the composite, a silenced (all-zero) sample included."""
    dc = coupler_net(channels, reduction)
    net = dc.network()
    g = torch.Generator().manual_seed(1)
    pooled = torch.randn(5, 2 * channels, generator=g).to(DEVICE)
    pooled[2] = 0.0  # its rows a_i are the LayerNorm's bias: silenced only where that is ~0
    pooled[3, :channels] = 3.0  # a constant half
    lam = triton_kernels.coupler_weights(pooled, net)
    want = composite.coupler_weights(pooled, net)
    close(lam, want)
    assert lam.min() < 0.3 and lam.max() > 0.7  # uneven: the test sees the weights
    grad_lam = torch.randn(lam.shape, generator=g).to(DEVICE)
    got_pooled, got = triton_kernels.coupler_weights_backward(pooled, net, grad_lam, 0.25)
    want_pooled, want = composite.coupler_weights_backward(pooled, net, grad_lam, 0.25)
    close(got_pooled, want_pooled)
    for name, a, b in zip(net.NAMES, got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(b.abs().max().item(), 1.0), msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(3, 6, 5, 7), (2, 40, 20, 15), (4, 9)], ids=["maps", "tiles", "vectors"])
def test_coupler_passes_over_the_maps(shape, dtype):
    """Pooling both branches, the weighted sum, dL/d weights from grad, out and shortcut, both branch
    gradients: each one launch, against the composite."""
    g = torch.Generator().manual_seed(2)
    main, shortcut, out, grad = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(4))
    b, c = shape[:2]
    lam = torch.rand(b, 2, c, generator=g).to(DEVICE) + 0.1
    added = torch.randn(b, 2 * c, generator=g).to(DEVICE)
    close(triton_kernels.coupler_pool(main, shortcut), composite.coupler_pool(main, shortcut))
    close(triton_kernels.coupler_forward(main, shortcut, lam), composite.coupler_forward(main, shortcut, lam), dtype)
    close(triton_kernels.coupler_weight_grads(grad, out, shortcut, lam),
          composite.coupler_weight_grads(grad, out, shortcut, lam))
    for got, want in zip(triton_kernels.coupler_grads(grad, lam, added), composite.coupler_grads(grad, lam, added)):
        assert got.dtype == dtype
        close(got, want, dtype)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_dynamic_coupler_training_on_triton_matches_composite(autocast, triton_mode):
    """The coupler's eager training path dispatching to Triton: output, both branch gradients and every
    parameter's gradient as the composite gives them (a frozen parameter keeps no gradient)."""
    dc = coupler_net(24, 4, seed=3)
    dc.in_norm.bias.requires_grad_(False)
    g = torch.Generator().manual_seed(4)
    main, shortcut, weight = (torch.randn(3, 24, 6, 5, generator=g).to(DEVICE) for _ in range(3))
    main[1] = 0.0  # a sample whose main branch is silent
    results = []
    for mode in ("triton", "eager"):
        kernels.set_kernels(mode)
        dc.zero_grad(set_to_none=True)
        m, s = main.clone().requires_grad_(), shortcut.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            out = dc(m.bfloat16() if autocast else m, s.bfloat16() if autocast else s)
        (out.float() * weight).sum().backward()
        results.append([out, m.grad, s.grad] + [p.grad for p in dc.parameters() if p.requires_grad])
        assert dc.in_norm.bias.grad is None
    for got, want in zip(*results, strict=True):
        if autocast:  # bf16 maps: the composite rounds the products, the kernels the results
            assert (got.float() - want.float()).norm() <= 2e-2 * want.float().norm()
        else:
            close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,samples", [((2, 5, 6, 7), 2), ((3 * 7, 130), 3), ((2 * 300, 20), 2),
                                           ((130, 3, 2, 2), 130)],
                         ids=["planes", "rows", "row_tiles", "planes_batch_tiles"])
def test_term_b_backward_spread_in_place(shape, samples, dtype):
    """Term-B's backward in one launch and its spread over x_t's gradient, in place, with the LayerNorm's
    gradients summed over the batch in the same second launch."""
    g = torch.Generator().manual_seed(5)
    grad_x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    c = shape[1] if len(shape) == 4 else shape[-1]
    nu, (gap, mean, rstd, weight) = term_b_inputs(samples, c, g)
    grad_nu = torch.randn(samples, c, generator=g).to(DEVICE)
    scale = samples * c / grad_x.numel()
    want_x = grad_x.clone()
    bias = torch.zeros_like(weight)
    want = composite.term_b_backward_into_(want_x, grad_nu, nu, gap, mean, rstd, weight, bias, scale)
    got = triton_kernels.term_b_backward_into_(grad_x, grad_nu, nu, gap, mean, rstd, weight, bias, scale)
    close(grad_x, want_x, dtype)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape == (c,)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def linear_site_inputs(dims, dtype, bias, seed=21):
    """x_pre (S, *, K) with a silenced row, the Linear's weight (C, K) and bias, x_t = the Linear in ``dtype`` (as
    autocast multiplies), term-B's LayerNorm parameters, eta and an incoming gradient."""
    g = torch.Generator().manual_seed(seed)
    *lead, k, c = dims
    x_pre = torch.randn(*lead, k, generator=g)
    x_pre.view(-1, k)[1] = 0
    weight = torch.randn(c, k, generator=g) / k ** 0.5
    b = torch.randn(c, generator=g) if bias else None
    x_t = nn.functional.linear(x_pre.to(dtype), weight.to(dtype), None if b is None else b.to(dtype))
    ln_weight, ln_bias = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.3
    eta, go = torch.rand(c, generator=g) * 0.8, torch.randn(x_t.shape, generator=g).to(dtype)
    return [None if t is None else t.to(DEVICE) for t in (x_pre, weight, b, x_t, ln_weight, ln_bias, eta, go)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dims", [(2, 5, 11, 7), (3, 130, 20, 40), (4, 24, 150), (2, 3, 2, 9, 17)],
                         ids=["tokens", "token_tiles", "vectors", "grid"])
def test_linear_site_statistics_forward_and_backward(dims, dtype, bias):
    """A norm-less Linear site: the statistics in one launch (the rows' norms and means of x_pre, GAP through
    the Linear with its operands rounded as the product was, term-B, the filters' norms), the forward from
    them, the backward's three launches (gradients of x_t, eta, the LayerNorm, the filters and the bias;
    x_pre's per-row and per-sample terms) and x_pre's gradient in one pass, against the composite."""
    x_pre, weight, b, x_t, ln_weight, ln_bias, eta, go = linear_site_inputs(dims, dtype, bias)
    s, r, c, k = x_pre.shape[0], x_pre.numel() // x_pre.shape[-1], weight.shape[0], weight.shape[1]
    args = (x_pre, dtype, weight, b, ln_weight, ln_bias, 1e-6, 1e-8, 1e-6 * k ** 0.5, 1e-8)
    got_stats, want_stats = triton_kernels.linear_site_stats(*args), composite.linear_site_stats(*args)
    got_parts = composite.linear_site_parts(got_stats, s, r, c, k)
    want_parts = composite.linear_site_parts(want_stats, s, r, c, k)
    for name in composite.LinearSiteStats._fields[:9]:  # the forward's parts
        torch.testing.assert_close(getattr(got_parts, name), getattr(want_parts, name), rtol=2e-5, atol=2e-5)
    assert torch.equal(got_parts.inv_x.view(-1)[1], torch.zeros((), device=DEVICE))  # the silenced row
    close(triton_kernels.linear_site_forward(x_t, eta, got_stats, k), composite.linear_site_forward(x_t, eta,
                                                                                                     want_stats, k), dtype)
    got = triton_kernels.linear_site_backward(go, x_t, eta, got_stats, weight, bias, ln_weight, 1e-8)
    want = composite.linear_site_backward(go, x_t, eta, want_stats, weight, bias, ln_weight, 1e-8)
    assert got.x.shape == go.shape and got.x.dtype == dtype
    close(got.x, want.x, dtype)
    for name in ("eta", "ln_weight", "ln_bias", "filters", "bias"):
        a, w = getattr(got, name), getattr(want, name)
        if w is None:
            assert a is None and not bias
            continue
        assert a.shape == w.shape
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-4 * max(w.abs().max().item(), 1.0), msg=name)
    for name in ("grad_inv", "input_spread"):
        w = getattr(want_parts, name)
        torch.testing.assert_close(getattr(got_parts, name), w, rtol=1e-4, atol=1e-4 * max(w.abs().max().item(), 1.0))
    add = torch.randn(x_pre.shape, device=DEVICE)
    want_in = composite.linear_site_input_grad(x_pre, want_stats, c, 1e-8, 1e-6 * k ** 0.5, add)
    torch.testing.assert_close(triton_kernels.linear_site_input_grad(x_pre, got_stats, c, 1e-8, 1e-6 * k ** 0.5),
                               want_in - add, rtol=1e-4, atol=1e-5)
    into = add.clone()
    assert triton_kernels.linear_site_input_grad(x_pre, got_stats, c, 1e-8, 1e-6 * k ** 0.5, into, True) is into
    torch.testing.assert_close(into, want_in, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,reduction", [((3, 40, 20, 15), 4), ((2, 300, 3, 3), 2), ((5, 8), 8)],
                         ids=["tiles", "channel_blocks", "vectors"])
def test_coupler_fusion_in_three_launches_each_way(shape, reduction, dtype):
    """The coupler's fusion (pooling, weight network, weighted sum into one state buffer) and its backward
    (sums, the network's backward, the branch gradients with the parameter-gradient programs in the same
    launch) against the composite's composition of its pieces; several row, position and channel blocks."""
    dc = coupler_net(shape[1], reduction, seed=4)
    net = dc.network()
    g = torch.Generator().manual_seed(6)
    main, shortcut, grad = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(3))
    out, state = triton_kernels.coupler_fusion(main, shortcut, net)
    want_out, want_state = composite.coupler_fusion(main, shortcut, net)
    close(out, want_out, dtype)
    torch.testing.assert_close(state, want_state, rtol=1e-5, atol=1e-5)
    got = triton_kernels.coupler_fusion_backward(grad, out, shortcut, state, net)
    want = composite.coupler_fusion_backward(grad, out, shortcut, state, net)
    for a, b in zip(got[:2], want[:2]):
        assert a.dtype == dtype and a.shape == b.shape
        close(a, b, dtype)
    for name, a, b in zip(net.NAMES, got[2], want[2], strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(b.abs().max().item(), 1.0), msg=name)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kernel_size", [3, 1])
def test_compiled_paths_unit_operation_on_triton(kernel_size, layout, triton_mode):
    """``actlab::iieu_unit`` and its backward (what a compiled model runs at a site) on the Triton kernels,
    with maps as the compiler hands them over (channels-last read in place): the composite's results, and
    outputs that are tensors of their own (the operator contract)."""
    from actlab.activations.iieu import inverse_filter_norms
    from actlab.activations.iieu.operation import iieu_unit_traced

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, kernel_size, padding=kernel_size // 2).to(DEVICE)
    unit = IIEUB(16, producer=conv, capture=False).to(DEVICE)
    with torch.no_grad():
        unit.eta.uniform_(0.2, 0.8)
    x_pre = torch.randn(2, 8, 9, 9, device=DEVICE)
    x_pre[0, :, :2, :2] = 0  # silenced patches
    x_t = conv(x_pre).detach()
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    results = []
    for mode in ("triton", "eager"):
        kernels.set_kernels(mode)
        xt = x_t.contiguous(memory_format=fmt).requires_grad_()
        xp = x_pre.contiguous(memory_format=fmt).requires_grad_()
        params = [unit.eta, unit.norm.weight, unit.norm.bias]
        out = iieu_unit_traced(xt, xp, inverse_filter_norms(conv.weight, unit.eps), *params, unit.patches,
                               unit.patch_eps(), True, unit.norm.eps)
        weight = torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)
        results.append((out, *torch.autograd.grad((out * weight).sum(), [xt, xp, conv.weight, *params])))
    assert results[0][2].stride() == results[0][2].contiguous(memory_format=fmt).stride()
    for a, b in zip(*results):
        close(a, b)
