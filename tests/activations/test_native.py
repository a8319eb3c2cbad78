"""actlab's C++ CPU kernels for the patch norms and the BatchNorm replay, against float64 references
written from their definitions; the pointwise patch windows against the convolution they replace."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from actlab.activations import IIEUB
from actlab.activations.iieu import ConvPatches
from actlab.activations.iieu.function import BatchNormReplay
from actlab.activations.kernels import composite, native


@pytest.fixture(scope="module", autouse=True)
def built():
    if not native.available():
        pytest.skip(f"native kernels not built here: {native.build_error()}")


def moments_reference(x: torch.Tensor):
    x = x.double().flatten(2)
    return x.mean(2), x.mean((0, 2)), x.var((0, 2), correction=0)


@pytest.mark.parametrize("shape,offset", [((4, 3, 37), 0.0), ((2, 5, 1100), 1000.0), ((1, 2, 7), -3.0),
                                          ((3, 4, 1), 0.5), ((2, 16, 64), 0.0)],
                         ids=["tail", "far_from_zero", "batch1_short", "one_position", "whole_vectors"])
@pytest.mark.parametrize("impl", ["native", "composite"])
def test_batch_moments(shape, offset, impl):
    """Per-plane means and per-channel mean and biased variance, float64; a map far from zero (mean 1000,
    spread 1) keeps its variance, which a sum of squares minus the squared mean would lose."""
    torch.manual_seed(0)
    x = torch.randn(shape) + offset
    got = (native if impl == "native" else composite).batch_moments(x)
    for a, b in zip(got, moments_reference(x)):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # float32 runs of the spread-1 values


@pytest.mark.parametrize("shape,groups", [((2, 6, 5, 7), 1), ((3, 40, 20, 60), 2), ((2, 8, 4, 4), 8),
                                          ((1, 3, 1, 1), 3)], ids=["dense", "spans", "depthwise", "one_position"])
def test_channel_sums_and_scales(shape, groups):
    """Sums of squares over each group's channels (positions beyond one L1 span of 1024 included), and
    each channel scaled by its group's per-position factor."""
    torch.manual_seed(1)
    x = torch.randn(shape)
    b, c = shape[:2]
    xd = x.double().view(b, groups, c // groups, *shape[2:])
    want = xd.square().sum(2)
    torch.testing.assert_close(native.channel_sumsq(x, groups, torch.float32).double(), want, rtol=1e-5, atol=1e-6)
    scale = torch.randn(b, groups, *shape[2:])
    want = (xd * scale.double().unsqueeze(2)).view(shape)
    torch.testing.assert_close(native.channel_scale(x, scale).double(), want, rtol=1e-6, atol=1e-7)
    add = torch.randn(shape)
    fresh = native.channel_scale(x, scale, add)
    torch.testing.assert_close(fresh.double(), want + add.double(), rtol=1e-6, atol=1e-6)
    into = native.channel_scale(x, scale, add, into_add=True)  # the caller's own gradient, written over
    assert into.data_ptr() == add.data_ptr() and torch.equal(into, fresh)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_pointwise_window_sums_are_the_convolution(stride):
    """1x1 producers skip the window convolution: their sums (a subsampling) and its adjoint equal the
    convolution's, on odd sizes where a stride leaves a partial last window."""
    conv = nn.Conv2d(4, 6, 1, stride=stride, bias=False)
    patches = ConvPatches.from_conv(conv)
    assert patches.pointwise
    sq = torch.rand(2, 1, 9, 7, dtype=torch.float64)
    want = F.conv2d(sq, torch.ones(1, 1, 1, 1, dtype=torch.float64), stride=stride)
    got = patches.window_sum(sq)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    grad = torch.randn_like(got)
    want_back = torch.nn.grad.conv2d_input(sq.shape, torch.ones(1, 1, 1, 1, dtype=torch.float64), grad, stride=stride)
    torch.testing.assert_close(patches.window_sum_backward(grad, (9, 7)), want_back, rtol=0, atol=0)
    assert not ConvPatches.from_conv(nn.Conv2d(4, 6, 1, padding=1)).pointwise


@pytest.mark.parametrize("training", [True, False], ids=["batch_stats", "running_stats"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batchnorm_replay_recomputes_x_t_and_its_gap(training, layout):
    """The affine map from the BatchNorm input and the statistics the BatchNorm used gives its output to
    float32 rounding; from batch statistics it also gives GAP(x_t)."""
    torch.manual_seed(3)
    norm = nn.BatchNorm2d(5, eps=1e-3)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
        norm.running_mean.uniform_(-1.0, 1.0)
        norm.running_var.uniform_(0.5, 2.0)
    norm.train(training)
    c = torch.randn(3, 5, 6, 7) * 4 + 2
    if layout == "channels_last":
        c = c.contiguous(memory_format=torch.channels_last)
    x_t = norm(c)
    replay = BatchNormReplay.of_call(norm, x_t)
    (source, scale, shift, hat_scale, hat_shift), gap = replay.prepare(norm, c, x_t)
    assert source is c
    torch.testing.assert_close(replay.replay(source, scale, shift), x_t, rtol=1e-5, atol=1e-5)
    shape = (1, -1, 1, 1)  # the weight multiplies xhat = c * hat_scale + hat_shift
    xhat = c * hat_scale.view(shape) + hat_shift.view(shape)
    torch.testing.assert_close(xhat * norm.weight.view(shape) + norm.bias.view(shape), x_t, rtol=1e-5, atol=1e-5)
    if training:
        torch.testing.assert_close(gap, x_t.mean((2, 3)), rtol=1e-5, atol=1e-5)
    else:
        assert gap is None


def test_unit_keeps_only_what_batchnorm_keeps_and_matches_the_reference():
    """A conv-BN-IIEU-B block trained with the replay (C++ kernels) matches the same block keeping x_t."""
    torch.manual_seed(4)
    conv, bn = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
    replayed, kept = IIEUB(16).bind(conv, norm=bn), IIEUB(16).bind(conv)
    x = torch.randn(4, 8, 9, 9)
    results = []
    for unit in (replayed, kept):
        xs = x.clone().requires_grad_()
        out = unit(bn(conv(xs)))
        results.append((out, *torch.autograd.grad(out.square().sum(), [xs, conv.weight, unit.eta])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 4, 16), (2, 5)], ids=["maps_tail", "whole_vectors", "no_positions"])
def test_coupler_kernels(shape):
    """The coupler's fused passes over maps (B, C, *S): weighted sum, dL/d weights from the sums over
    positions, both branch gradients, against float64 by hand."""
    torch.manual_seed(6)
    main, shortcut, out, grad = (torch.randn(shape) for _ in range(4))
    b, c = shape[:2]
    lam, add = torch.rand(b, 2, c) + 0.1, torch.randn(b, 2 * c)
    view = (lambda t: t.double().view(b, c, *(1,) * (len(shape) - 2)))
    w1, w2 = lam[:, 0], lam[:, 1]
    want = view(w1) * main.double() + view(w2) * shortcut.double()
    torch.testing.assert_close(native.coupler_forward(main, shortcut, lam).double(), want, rtol=1e-6, atol=1e-6)
    dims = tuple(range(2, len(shape)))
    sums = [(grad.double() * t.double()).sum(dims) if dims else grad.double() * t.double() for t in (main, shortcut)]
    # dL/d l1 = sum of grad * main, recovered from out = l1 * main + l2 * shortcut
    out = native.coupler_forward(main, shortcut, lam)
    got = native.coupler_weight_grads(grad, out, shortcut, lam)
    torch.testing.assert_close(got.double(), torch.stack(sums, 1), rtol=1e-4, atol=1e-4)
    for g, w, a in zip(native.coupler_grads(grad, lam, add), (w1, w2), add.view(b, 2, c).unbind(1)):
        assert g.shape == grad.shape and g.is_contiguous()
        torch.testing.assert_close(g.double(), grad.double() * view(w) + view(a), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("training", [True, False], ids=["batch_stats", "running_stats"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_backward_through_the_batchnorm(training, affine):
    """At conv-BN-IIEU-B sites the unit differentiates through the BatchNorm itself (two passes over the
    BatchNorm input): float64 gradcheck of the whole block, and the same gradients as the plain ops of the
    formulas (BatchNorm, IIEU-B, with autograd) in float32 through the C++ kernels."""
    import references as ref

    def block(dtype):
        torch.manual_seed(8)
        conv = nn.Conv2d(4, 6, 3, padding=1, bias=False).to(dtype)
        norm = nn.BatchNorm2d(6, affine=affine).to(dtype)
        unit = IIEUB(6).to(dtype).bind(conv, norm=norm)
        with torch.no_grad():
            unit.eta.fill_(0.5)  # both adjuster branches
            unit.norm.weight.uniform_(0.5, 1.5)
            norm.running_mean.uniform_(-0.3, 0.3)
            if affine:
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.3, 0.3)
        norm.train(training)
        return conv, norm, unit

    conv, norm, unit = block(torch.float64)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    params = [p for p in (conv.weight, norm.weight, norm.bias, unit.eta, unit.norm.weight) if p is not None]
    assert torch.autograd.gradcheck(lambda inp, *ps: unit(norm(conv(inp))), (x, *params))

    conv, norm, unit = block(torch.float32)
    params = [p for p in (conv.weight, norm.weight, norm.bias, unit.eta, unit.norm.weight, unit.norm.bias)
              if p is not None]
    xs = torch.randn(4, 4, 9, 9, requires_grad=True)
    weight = torch.randn(4, 6, 9, 9)
    out = unit(norm(conv(xs)))
    assert type(out.grad_fn).__name__ == "IIEUNormFunctionBackward"  # the fused backward is what is tested here
    got = torch.autograd.grad((out * weight).sum(), [xs, *params])
    expected = ref.iieu_b(unit, norm(conv(xs)), xs, conv)
    want = torch.autograd.grad((expected * weight).sum(), [xs, *params])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("silent", [-1.0, 0.3])
def test_inverse_norm_maps(silent):
    """invX and its gradient w.r.t. the squared norms on (B, G, H, W) maps: zero norms (gradient 0, not
    NaN), silenced norms (both 0) and ordinary ones, as the composite computes them."""
    torch.manual_seed(9)
    sumsq = torch.rand(2, 3, 5, 7) * 4
    sumsq[0, 0, 0, :3] = 0
    sumsq[1, 2, 4, :3] = 0.01  # norm 0.1: silenced when silent = 0.3
    grad_inv = torch.randn_like(sumsq)
    got = native.inverse_norm(sumsq, 1e-8, silent)
    torch.testing.assert_close(got, composite.inverse_norm(sumsq, 1e-8, silent), rtol=1e-6, atol=0)
    got = native.inv_norm_grad_sumsq(sumsq, grad_inv, 1e-8, silent)
    want = composite.inv_norm_grad_sumsq(sumsq, grad_inv, 1e-8, silent)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert torch.isfinite(got).all() and (got[0, 0, 0, :3] == 0).all()


@pytest.mark.parametrize("tokens,shape", [(False, (3, 5, 7)), (False, (4, 8, 64)), (False, (1, 1, 1)),
                                          (True, (2, 9, 13)), (True, (2, 16, 40)), (True, (3, 1, 5))],
                         ids=["maps_unaligned", "maps_whole_bytes", "one_element", "tokens_unaligned",
                              "tokens_whole_bytes", "one_token"])
@pytest.mark.parametrize("tau", [0.0, 0.3, -0.2])
def test_tau_pool_pass_mask_and_backward(tokens, shape, tau):
    """The fused DPA pass writes the bit-packed mask x >= tau (ties pass, NaN does not) for planes and
    samples that start inside a byte; backward reads only the mask."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g)
    x.view(-1)[::5] = tau
    x.view(-1)[x.numel() // 2] = float("nan")
    out, v, passes = native.tau_pool(x, tau, tokens)
    want_passes = composite.pack_bits(x >= tau)
    assert torch.equal(passes, want_passes)
    torch.testing.assert_close(out, torch.where(x < tau, torch.zeros_like(x), x), equal_nan=True)
    torch.testing.assert_close(v, x.double().mean(1 if tokens else 2).float(), equal_nan=True)
    grad_out = torch.randn(shape, generator=g)
    grad_v = torch.randn(v.shape, generator=g)
    spread = (grad_v / shape[1]).unsqueeze(1) if tokens else (grad_v / shape[2]).unsqueeze(2)
    want = torch.where(x >= tau, grad_out, torch.zeros(())) + spread
    torch.testing.assert_close(native.tau_pool_backward(grad_out, passes, grad_v, tokens), want)
    torch.testing.assert_close(native.tau_pool_backward(grad_out, passes, None, tokens),
                               torch.where(x >= tau, grad_out, torch.zeros(())))


@pytest.mark.parametrize("numel", [1, 13, 16384, 100003])
def test_pass_mask_and_masked_grad(numel):
    g = torch.Generator().manual_seed(8)
    x, grad = torch.randn(numel, generator=g), torch.randn(numel, generator=g)
    grad[0] = float("inf")  # a masked-out non-finite gradient is 0, as through ReLU's backward
    passes = native.pass_mask(x, 0.1)
    assert torch.equal(passes, composite.pack_bits(x >= 0.1))
    assert torch.equal(native.masked_grad(grad, passes), torch.where(x >= 0.1, grad, torch.zeros(())))
