"""IIEU-B against the reference (tests/references.py) across conv geometries and linear sites, plus its edge cases."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from actlab.activations import IIEUB
from actlab.perf.timing import saved_bytes
from actlab.activations.iieu import ConvPatches, IIEUFunction, LinearPatches, inverse_filter_norms
from actlab.activations.iieu.function import TrainSite
import references as ref

GEOMETRIES = {
    # name: (Cin, Cout, kernel, stride, padding, dilation, groups, H)
    "3x3": (6, 8, 3, 1, 1, 1, 1, 7),
    "stride2": (6, 8, 3, 2, 1, 1, 1, 9),
    "dilation2": (6, 8, 3, 1, 2, 2, 1, 9),
    "depthwise": (6, 6, 3, 1, 1, 1, 6, 7),
    "depthwise_stride2": (6, 12, 3, 2, 1, 1, 6, 8),
    "grouped": (6, 9, 3, 1, 1, 1, 3, 7),
    "1x1": (6, 8, 1, 1, 0, 1, 1, 5),
    "7x7_stride2_stem": (3, 8, 7, 2, 3, 1, 1, 16),
    "same_even_kernel": (4, 5, 4, 1, "same", 1, 1, 7),
    "valid": (4, 5, 3, 1, "valid", 1, 1, 7),
    "rect_kernel": (4, 5, (1, 3), (1, 2), (0, 1), 1, 1, 7),
}


def conv_site(geom, norm: bool, seed=0, bias=True):
    torch.manual_seed(seed)
    cin, cout, k, s, p, d, g, _ = geom
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, bias=bias).double()
    bn = nn.BatchNorm2d(cout).double() if norm else nn.Identity()
    unit = IIEUB(cout).double()
    with torch.no_grad():
        unit.eta.uniform_(-0.2, 0.3)
        unit.norm.weight.uniform_(0.5, 1.5)
        unit.norm.bias.uniform_(-0.5, 0.5)
    unit.bind(conv)
    return conv, bn, unit


def check_against_reference(x, producer, norm, unit, rtol=1e-9):
    x = x.clone().requires_grad_(True)
    out = unit(norm(producer(x)))
    expected = ref.iieu_b(unit, norm(producer(x)), x, producer)
    torch.testing.assert_close(out, expected, rtol=rtol, atol=1e-12)
    params = [x, producer.weight, unit.eta, unit.norm.weight, unit.norm.bias]
    w = torch.randn_like(out)
    got = torch.autograd.grad((out * w).sum(), params)
    want = torch.autograd.grad((expected * w).sum(), params)
    for name, a, b in zip(["x_pre", "weight", "eta", "ln.weight", "ln.bias"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10, msg=lambda m: f"grad {name}: {m}")
    return out


@pytest.mark.parametrize("norm", [True, False], ids=["bn", "no_norm"])
@pytest.mark.parametrize("geom", list(GEOMETRIES), ids=list(GEOMETRIES))
def test_conv_sites_match_reference(geom, norm):
    conv, bn, unit = conv_site(GEOMETRIES[geom], norm)
    h = GEOMETRIES[geom][-1]
    check_against_reference(torch.randn(3, GEOMETRIES[geom][0], h, h + 1, dtype=torch.float64), conv, bn.train(), unit)


@pytest.mark.parametrize("shape", [(4, 6), (3, 5, 6), (2, 3, 4, 6)], ids=["BC", "BNC", "BHWC"])
@pytest.mark.parametrize("norm", [True, False], ids=["ln", "no_norm"])
def test_linear_sites_match_reference(shape, norm):
    torch.manual_seed(0)
    lin = nn.Linear(6, 7).double()
    ln = nn.LayerNorm(7).double() if norm else nn.Identity()
    unit = IIEUB(7, producer=lin).double()
    with torch.no_grad():
        unit.norm.weight.uniform_(0.5, 1.5)
    check_against_reference(torch.randn(*shape, dtype=torch.float64), lin, ln, unit)


def test_batch_size_one():
    conv, bn, unit = conv_site(GEOMETRIES["3x3"], norm=True)
    check_against_reference(torch.randn(1, 6, 5, 5, dtype=torch.float64), conv, bn.train(), unit)
    lin = nn.Linear(4, 3).double()
    check_against_reference(torch.randn(1, 4, dtype=torch.float64), lin, nn.Identity(), IIEUB(3, producer=lin).double())


def test_zero_patches_are_silenced():
    conv, _, unit = conv_site(GEOMETRIES["3x3"], norm=False)
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    x[:, :, :, :4] = 0  # a black left half: patches fully inside it have no direction
    out = check_against_reference(x, conv, nn.Identity(), unit)
    # inside the zero region x_t is the conv bias; the unit must scale it by s(nu) only (term-S = 0)
    x_t = conv(x)
    nu = torch.sigmoid(torch.nn.functional.layer_norm(x_t.mean((2, 3)), (8,), unit.norm.weight, unit.norm.bias, 1e-6))
    eta = unit.eta
    s_nu = torch.where(nu >= eta, nu, eta * torch.exp(nu - eta))
    inside = out[:, :, :, :3]
    torch.testing.assert_close(inside, s_nu[:, :, None, None] * x_t[:, :, :, :3])
    assert out.abs().max() < 100 * x_t.abs().max()


def test_published_zero_patch_rule_is_reachable():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.zeros(1, 3, 6, 6, dtype=torch.float64)
    x[:, :, 0, 0] = 1.0
    silent = IIEUB(4, producer=conv).double()
    published = IIEUB(4, producer=conv, zero_patch="published").double()
    check_against_reference(x, conv, nn.Identity(), published)
    a, b = silent(conv(x)), published(conv(x))
    # far from the single non-zero pixel the patch is all zero: published scales by ~1e8 / 3, ours does not
    assert b[0, :, 4, 4].abs().max() > 1e6 * a[0, :, 4, 4].abs().max()
    x_t = conv(x)[0, :, 4, 4]  # all-zero patch: term-S = x_t / ((||w|| + eps) * 3e-8), as published
    term_s = x_t / (conv.weight.flatten(1).norm(dim=1) + 1e-8) / 3e-8
    assert published.patch_eps() == pytest.approx(3e-8)
    up = term_s > 0  # there rho = term_s + nu is huge and the unit passes rho * x_t; below it is ~0
    assert up.any() and torch.allclose(b[0, up, 4, 4], term_s[up] * x_t[up], rtol=1e-3)
    with pytest.raises(ValueError, match="zero_patch"):
        IIEUB(4, zero_patch="off")


def test_grouped_norm_uses_only_group_channels():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 1, groups=2, bias=False).double()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    x[:, 2:] *= 1000  # the second group is huge; the first group's term-S must not see it
    patches = ConvPatches.from_conv(conv)
    sumsq = patches.sumsq(x)
    torch.testing.assert_close(sumsq[:, 0], x[:, :2].square().sum(1))
    torch.testing.assert_close(sumsq[:, 1], x[:, 2:].square().sum(1))


GRADCHECK_GEOMS = ["3x3", "stride2", "depthwise_stride2", "grouped", "same_even_kernel"]


@pytest.mark.parametrize("geom", GRADCHECK_GEOMS)
@pytest.mark.parametrize("silence", [True, False])
def test_gradcheck_conv_function(geom, silence):
    torch.manual_seed(0)
    cin, cout, k, s, p, d, g, _ = GEOMETRIES[geom]
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g)
    patches = ConvPatches.from_conv(conv)
    x_pre = torch.randn(2, cin, 5, 6, dtype=torch.float64, requires_grad=True)
    x_t = torch.randn(2, cout, *patches.output_hw(5, 6), dtype=torch.float64, requires_grad=True)
    inv_w = torch.rand(cout, dtype=torch.float64).add(0.5).requires_grad_()
    nu = torch.rand(2, cout, dtype=torch.float64).requires_grad_()
    eta = torch.full((cout,), 0.3, dtype=torch.float64, requires_grad=True)
    site = TrainSite.plain(patches, 1e-8, silence)
    assert torch.autograd.gradcheck(lambda *t: IIEUFunction.apply(*t, None, None, site), (x_t, x_pre, inv_w, nu, eta))


@pytest.mark.parametrize("shape,nu_shape", [((3, 5), (3, 4)), ((2, 3, 5), (2, 4)), ((2, 3, 5), (2, 3, 4))])
def test_gradcheck_linear_function(shape, nu_shape):
    torch.manual_seed(0)
    patches = LinearPatches(5, 4)
    x_pre = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    x_t = torch.randn(*shape[:-1], 4, dtype=torch.float64, requires_grad=True)
    inv_w = torch.rand(4, dtype=torch.float64).add(0.5).requires_grad_()
    nu = torch.rand(*nu_shape, dtype=torch.float64).requires_grad_()
    eta = torch.full((4,), 0.3, dtype=torch.float64, requires_grad=True)
    site = TrainSite.plain(patches)
    assert torch.autograd.gradcheck(lambda *t: IIEUFunction.apply(*t, None, None, site), (x_t, x_pre, inv_w, nu, eta))


@pytest.mark.parametrize("site", ["conv", "tokens", "flat"])
def test_gradcheck_whole_unit_with_term_b_folded_into_backward(site):
    """The unit computes term-B from a detached GAP and adds that path's gradient in its backward."""
    torch.manual_seed(0)
    if site == "conv":
        producer = nn.Conv2d(3, 4, 3, padding=1, groups=1).double()
        x_pre = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    else:
        producer = nn.Linear(3, 4).double()
        x_pre = torch.randn(*((2, 3, 3) if site == "tokens" else (3, 3)), dtype=torch.float64, requires_grad=True)
    unit = IIEUB(4, producer=producer, capture=False).double()
    with torch.no_grad():
        unit.norm.weight.uniform_(0.5, 1.5)
        unit.eta.fill_(0.6)
    x_t = producer(x_pre).detach().requires_grad_()
    params = (x_t, x_pre, unit.norm.weight, unit.norm.bias, unit.eta)
    assert torch.autograd.gradcheck(lambda xt, xp, *_: unit(xt, xp), params)


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e15])
def test_zero_and_huge_inputs_are_finite(scale):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    unit = IIEUB(6, producer=conv)
    x = (torch.randn(2, 4, 6, 6) * scale).requires_grad_()
    out = unit(conv(x))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(unit.eta.grad).all() and torch.isfinite(conv.weight.grad).all()


def test_bf16_autocast_close_to_float32():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
    unit = IIEUB(16, producer=conv)
    x = torch.randn(4, 8, 10, 10)
    ref32 = unit(bn(conv(x)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unit(bn(conv(x)))
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref32).norm() / ref32.norm()
    assert err < 2e-2, err
    assert unit.eta.grad.dtype == torch.float32 and torch.isfinite(unit.eta.grad).all()


def conv_bn_block(replay: bool, seed: int = 0):
    torch.manual_seed(seed)
    conv, bn = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
    unit = IIEUB(32).bind(conv, norm=bn if replay else None)
    with torch.no_grad():
        unit.eta.fill_(0.5)  # both adjuster branches
    return conv, bn, unit


@pytest.mark.parametrize("kernels", ["eager", "native"])
@pytest.mark.parametrize("bn_mode", ["train", "eval"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_batchnorm_replay_gives_the_same_gradients(bn_mode, autocast, kernels, restore_kernels):
    """x_t recomputed from the BatchNorm's input and statistics (the C++ kernel applies the affine map as
    it reads c) gives the gradients of keeping x_t, to float rounding."""
    restore_kernels.set_kernels(kernels)
    x = torch.randn(4, 32, 8, 8)
    grads = []
    for replay in (True, False):
        conv, bn, unit = conv_bn_block(replay)
        bn.train(bn_mode == "train")
        with torch.no_grad():
            bn.running_mean.uniform_(-0.2, 0.2)
        xs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = unit(bn(conv(xs)))
            loss = out.float().square().sum()
        grads.append(torch.autograd.grad(loss, [xs, conv.weight, bn.weight, unit.eta, unit.norm.weight]))
    for with_replay, without in zip(*grads):
        err = ((with_replay - without).norm() / without.norm()).item()
        assert err < (2e-2 if autocast else 2e-6), err  # bf16: GAP from c's statistics, not the rounded x_t
        assert not torch.equal(without, torch.zeros_like(without))


def test_saved_memory_close_to_relu():
    x = torch.randn(8, 32, 16, 16, requires_grad=True)

    def two_layers(make_act):
        torch.manual_seed(0)
        layers = []
        for _ in range(2):
            conv, bn = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
            layers.append((conv, bn, make_act(conv, bn)))

        def run():
            h = x
            for conv, bn, act in layers:
                h = act(bn(conv(h)))
            return h.square().mean()
        return run

    relu = saved_bytes(two_layers(lambda conv, bn: nn.ReLU()))
    replay = saved_bytes(two_layers(lambda conv, bn: IIEUB(32).bind(conv, norm=bn)))
    keep = saved_bytes(two_layers(lambda conv, bn: IIEUB(32).bind(conv)))
    assert replay <= 1.05 * relu, (replay, relu)
    assert keep > 1.3 * relu  # without the replay the unit keeps x_t: the test measures something real


def mlp_block(recompute: bool, seed: int = 0):
    torch.manual_seed(seed)
    fc1, fc2 = nn.Linear(24, 96), nn.Linear(96, 24)
    unit = IIEUB(96, recompute_linear=recompute).bind(fc1)
    with torch.no_grad():
        unit.eta.fill_(0.5)  # both adjuster branches
    return lambda x: fc2(unit(fc1(x))), (fc1.weight, fc1.bias, unit.eta, unit.norm.weight)


@pytest.mark.parametrize("kernels", ["eager", "native"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_linear_recompute_gives_identical_gradients_and_saves_a_map(kernels, autocast, restore_kernels):
    """A Linear site without a norm recomputes x_t in backward: same gradients, memory of a ReLU MLP."""
    restore_kernels.set_kernels(kernels)
    x = torch.randn(4, 65, 24)
    grads, saved = [], []
    for recompute in (True, False):
        block, params = mlp_block(recompute)
        xs = x.clone().requires_grad_()

        def loss():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return block(xs).float().square().sum()
        grads.append(torch.autograd.grad(loss(), [xs, *params]))
        saved.append(saved_bytes(loss))
    for recomputed, kept in zip(*grads):
        assert torch.equal(recomputed, kept)
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(24, 96), nn.Linear(96, 24)
    relu = saved_bytes(lambda: fc2(torch.relu(fc1(x.clone().requires_grad_()))).square().sum())
    map_bytes = x.shape[0] * x.shape[1] * 96 * (2 if autocast else 4)
    assert saved[0] <= relu + 0.2 * map_bytes, (saved, relu)
    assert saved[1] >= saved[0] + 0.9 * map_bytes  # the kept x_t: the comparison measures something real


@pytest.mark.parametrize("case", ["input_without_grad", "frozen_weight"])
def test_linear_recompute_where_autograd_keeps_one_operand(case):
    """A first layer's input (no gradient wanted) or a frozen weight: autograd keeps only the operand the
    other's gradient needs, so the unit recomputes x_t from the Linear's input and weights instead."""
    x = torch.randn(4, 65, 24)
    grads = []
    for recompute in (True, False):
        block, params = mlp_block(recompute)
        if case == "frozen_weight":
            params[0].requires_grad_(False)
            xs = x.clone().requires_grad_()
            wanted = [xs, *params[1:]]
        else:
            xs, wanted = x, list(params)
        grads.append(torch.autograd.grad(block(xs).square().sum(), wanted))
    for recomputed, kept in zip(*grads):
        torch.testing.assert_close(recomputed, kept, rtol=1e-6, atol=1e-7)


def test_modified_norm_output_falls_back_to_keeping_it():
    conv, bn, unit = conv_bn_block(replay=True)
    x = torch.randn(2, 32, 6, 6, requires_grad=True)
    x_t = bn(conv(x))
    x_t.mul_(2.0)  # no longer the BatchNorm's output: replaying it would be wrong
    out = unit(x_t)
    expected = ref.iieu_b(unit, x_t, x, conv)
    torch.testing.assert_close(out, expected)
    g1 = torch.autograd.grad(out.sum(), x, retain_graph=True)[0]
    g2 = torch.autograd.grad(expected.sum(), x)[0]
    torch.testing.assert_close(g1, g2)


def test_unbound_unit_and_mismatched_producer_errors():
    unit = IIEUB(4)
    unit.site = "features.3"
    with pytest.raises(RuntimeError, match="features.3.*no producer input"):
        unit(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match="4 output channels, unit has 5"):
        IIEUB(5, producer=nn.Conv2d(3, 4, 3))
    with pytest.raises(TypeError, match="nn.Conv2d, nn.Linear or transformers. Conv1D"):
        IIEUB(4, producer=nn.Conv1d(3, 4, 3))
    conv = nn.Conv2d(3, 4, 3)
    unit = IIEUB(4, producer=conv)
    conv(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="does not match the producer's output"):
        unit(torch.randn(1, 4, 5, 5))


def test_parameters_names_and_init():
    unit = IIEUB(12)
    names = dict(unit.named_parameters())
    assert set(names) == {"eta", "norm.weight", "norm.bias"}
    assert torch.equal(unit.eta, torch.full((12,), 0.05))
    assert isinstance(unit.norm, nn.LayerNorm) and unit.norm.eps == 1e-6
    assert torch.equal(unit.norm.weight, torch.full((12,), 0.01)) and torch.equal(unit.norm.bias, torch.zeros(12))
    assert math.isclose(unit.eps, 1e-8)


def test_inverse_filter_norms():
    w = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    torch.testing.assert_close(inverse_filter_norms(w, 1e-8), torch.tensor([1 / 5, 1.0]), rtol=1e-6, atol=0)
    torch.testing.assert_close(inverse_filter_norms(w.requires_grad_(), 1e-8), torch.tensor([1 / 5, 1.0]),
                               rtol=1e-6, atol=0)


def test_inverse_filter_norms_gradient():
    """The one-pass backward against float64 gradcheck, and 0 (not NaN) for an all-zero filter."""
    from actlab.activations.iieu.module import InverseFilterNorms

    w = torch.randn(5, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: InverseFilterNorms.apply(t, 1e-3), (w,))
    zero = torch.zeros(2, 4, requires_grad=True)
    inverse_filter_norms(zero, 1e-8).sum().backward()
    assert torch.equal(zero.grad, torch.zeros(2, 4))


@pytest.fixture
def restore_kernels():
    from actlab.activations import kernels

    yield kernels
    kernels.set_kernels(os.environ.get("ACTLAB_KERNELS", "auto"))


@pytest.mark.parametrize("kernels", ["native", "eager"])
def test_inverse_filter_norms_of_conv_filters_as_they_are(kernels, restore_kernels):
    """(C_out, C_in, kh, kw) filters go to the kernels without a reshape: values and gradient as the norm's."""
    restore_kernels.set_kernels(kernels)
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3, requires_grad=True)
    inv = inverse_filter_norms(w, 1e-8)
    reference = w.detach().clone().requires_grad_()
    want = 1.0 / (reference.flatten(1).norm(dim=1) + 1e-8)
    torch.testing.assert_close(inv, want)
    g = torch.randn(6)
    (inv * g).sum().backward()
    (want * g).sum().backward()
    assert w.grad.shape == w.shape
    torch.testing.assert_close(w.grad, reference.grad)


KERNEL_SITES = {  # producer, norm, input: every layout the fused kernels handle
    "conv": (lambda: nn.Conv2d(6, 8, 3, padding=1), lambda: nn.BatchNorm2d(8), (4, 6, 9, 9)),
    "conv_grouped": (lambda: nn.Conv2d(6, 8, 3, stride=2, groups=2), lambda: nn.BatchNorm2d(8), (3, 6, 9, 7)),
    "depthwise": (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), lambda: nn.Identity(), (2, 8, 5, 5)),
    "linear_tokens": (lambda: nn.Linear(6, 11), lambda: nn.LayerNorm(11), (4, 5, 6)),
    "linear_2d": (lambda: nn.Linear(6, 11), lambda: nn.Identity(), (5, 6)),
    "linear_batch1": (lambda: nn.Linear(6, 11), lambda: nn.Identity(), (1, 7, 6)),
}


@pytest.mark.parametrize("site", list(KERNEL_SITES) + ["linear_published", "conv_channels_last"])
def test_fused_kernels_match_eager(site, restore_kernels):
    """actlab's C++ CPU kernels give the composite's values and gradients, zero patches (silenced, or
    the published 1 / (0 + eps)) and both branches of the adjuster included."""
    kernels, mode = restore_kernels, "native"
    from actlab.activations.kernels import native

    if not native.available():
        pytest.skip(f"native kernels not built here: {native.build_error()}")
    channels_last = site == "conv_channels_last"
    site = "conv" if channels_last else site
    zero_patch = "published" if site == "linear_published" else "silence"
    make_producer, make_norm, shape = KERNEL_SITES["linear_tokens" if zero_patch == "published" else site]
    torch.manual_seed(0)
    producer, norm = make_producer(), make_norm()
    x = torch.randn(shape)
    if isinstance(producer, nn.Conv2d):
        x[0, ..., :2] = 0  # zero patches
        if channels_last:  # taken as rows (B * H * W, C) without a layout copy
            x = x.contiguous(memory_format=torch.channels_last)
            producer, norm = producer.to(memory_format=torch.channels_last), norm.to(memory_format=torch.channels_last)
    else:
        rows = x.view(-1, shape[-1])
        rows[:2] = 0  # zero tokens
        for row, rms in ((2, 0.8e-6), (3, 1.25e-6)):  # just below / above the silencing RMS of 1e-6
            rows[row] *= rms * shape[-1] ** 0.5 / rows[row].norm()
    unit = IIEUB(producer.weight.shape[0], producer=producer, zero_patch=zero_patch)
    with torch.no_grad():
        unit.eta.uniform_(0.2, 0.8)  # both branches of the adjuster are taken
        unit.norm.weight.uniform_(0.5, 1.5)
    results = {}
    for name in (mode, "eager"):
        kernels.set_kernels(name)
        xs = x.clone().requires_grad_()
        out = unit(norm(producer(xs)))
        grads = torch.autograd.grad((out * torch.linspace(-1, 2, out.numel()).view_as(out)).sum(),
                                    [xs, unit.eta, unit.norm.weight, producer.weight])
        results[name] = (out, *grads)
    for a, b in zip(results[mode], results["eager"]):  # float32 sums in another order: relative to the scale
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


def test_unknown_kernel_mode(restore_kernels):
    with pytest.raises(ValueError, match="one of"):
        restore_kernels.set_kernels("fast")


@pytest.mark.parametrize("site", ["grouped_conv", "linear_tokens"])
def test_ii_score_is_the_spec_rho(site):
    if site == "grouped_conv":
        conv, bn, unit = conv_site(GEOMETRIES["grouped"], norm=True)
        x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
        x[0, :, :3] = 0  # silenced patches: rho = nu there
        producer = conv
    else:
        torch.manual_seed(0)
        producer, bn, unit = nn.Linear(6, 5).double(), nn.LayerNorm(5).double(), IIEUB(5).double()
        unit.bind(producer)
        x = torch.randn(3, 4, 6, dtype=torch.float64)
    x_t = bn(producer(x))
    rho, _ = ref.ii_score(unit, x_t, x, producer)
    torch.testing.assert_close(unit.ii_score(x_t, x).double(), rho.expand_as(x_t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["rows", "planes"])
def test_native_kernels_on_whole_vectors_above_below_and_mixed(layout):
    """The C++ kernels skip exp for vectors with no response below eta: runs of 8 lanes all above, all
    below and mixed must all give the eager kernels' values and gradient sums."""
    from actlab.activations.kernels import composite, native

    if not native.available():
        pytest.skip(f"native kernels not built here: {native.build_error()}")
    torch.manual_seed(0)
    channels, positions = 16, 37  # two full vectors and, on planes, a tail of 5
    pattern = torch.tensor([0.9] * 8 + [-0.9] * 8 + [0.9, -0.9] * 4 + [-0.9] * 13)  # above / below / mixed
    if layout == "rows":  # (R, C) rows of 2 samples; along C: one all-above and one all-below vector
        x = torch.randn(2 * positions, channels).abs() * pattern[:channels]
        x[::3] *= pattern[16:16 + channels]  # some rows mixed within each vector
        inv = torch.rand(2 * positions) + 0.5
    else:  # (B, C, P) with one group: along P, the pattern's runs
        x = torch.randn(2, channels, positions).abs() * pattern[:positions]
        inv = torch.rand(2, 1, positions) + 0.5
    nu, inv_w, eta = torch.zeros(2, channels), torch.ones(channels), torch.full((channels,), 0.05)
    rho = composite.iieu_rho(x, inv, inv_w, nu)
    assert (rho < 0.05).any() and (rho >= 0.05).any()
    go = torch.randn_like(x)
    torch.testing.assert_close(native.iieu_forward(x, inv, inv_w, nu, eta),
                               composite.iieu_forward(x, inv, inv_w, nu, eta), rtol=1e-6, atol=1e-7)
    got = native.iieu_backward(go, x, inv, inv_w, nu, eta)
    want = composite.iieu_backward(go, x, inv, inv_w, nu, eta)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_patch_norm_gradient_through_the_producer_input_tap():
    """In eager training the patch norms' gradient joins the producer's input gradient in the tap the
    input passes through: two units on one shared input (a bottleneck's conv1 and its projection
    shortcut) match the reference, and a second backward over a retained graph gives the same gradients."""
    torch.manual_seed(7)
    convs = [nn.Conv2d(6, 8, 1, bias=False).double(), nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False).double()]
    norms = [nn.BatchNorm2d(8).double() for _ in convs]
    units = [IIEUB(8).double().bind(conv, norm=bn) for conv, bn in zip(convs, norms)]
    x = torch.randn(3, 6, 9, 9, dtype=torch.float64, requires_grad=True)
    out = sum(unit(bn(conv(x))).square().sum() for conv, bn, unit in zip(convs, norms, units))
    assert all(unit._tap is None for unit in units)  # each consumed its tap
    first = torch.autograd.grad(out, [x, convs[0].weight], retain_graph=True)
    second = torch.autograd.grad(out, [x, convs[0].weight])
    expected = sum(ref.iieu_b(unit, bn(conv(x)), x, conv).square().sum() for conv, bn, unit in zip(convs, norms, units))
    want = torch.autograd.grad(expected, [x, convs[0].weight])
    for a, b, w in zip(first, second, want):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, w, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("replay", [True, False], ids=["bn_site", "kept_x_t"])
def test_in_place_operation_on_the_output(replay):
    """A following in-place operation (a residual "+=", an in-place activation) on IIEU-B's output is
    allowed in training and gives the gradients of the out-of-place operation."""
    conv, bn, unit = conv_bn_block(replay)
    x = torch.randn(2, 32, 6, 6)
    grads = []
    for in_place in (True, False):
        xs = x.clone().requires_grad_()
        out = unit(bn(conv(xs)))
        out = out.add_(1.0) if in_place else out + 1.0
        grads.append(torch.autograd.grad(out.square().sum(), [xs, unit.eta]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


class _Casts(TorchDispatchMode):
    """Records (numel, source dtype, target dtype) of every dtype cast dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.casts = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and "dtype" in kwargs:
            self.casts.append((args[0].numel(), args[0].dtype, kwargs["dtype"]))
        return func(*args, **kwargs)


def test_linear_recompute_under_autocast_multiplies_the_saved_bf16_operands():
    """Under bf16 autocast x_t is recomputed from the bf16 input and weight the Linear saved for its own
    backward: backward casts neither the input nor the weight to bf16 again, and the gradients equal
    those of the unit that keeps x_t."""
    x = torch.randn(4, 65, 24)
    grads = []
    for recompute in (True, False):
        torch.manual_seed(0)
        fc1, head = nn.Linear(24, 96), nn.Linear(96, 5)  # no other map of x's size is cast in backward
        unit = IIEUB(96, recompute_linear=recompute).bind(fc1)
        xs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = head(unit(fc1(xs))).float().square().sum()
        with _Casts() as mode:
            grads.append(torch.autograd.grad(loss, [xs, fc1.weight, fc1.bias, unit.eta, unit.norm.weight]))
        to_bf16 = [n for n, src, dst in mode.casts if src == torch.float32 and dst == torch.bfloat16]
        assert x.numel() not in to_bf16 and fc1.weight.numel() not in to_bf16, mode.casts
    for recomputed, kept in zip(*grads):
        assert torch.equal(recomputed, kept)


def test_units_follow_their_norm_into_sync_batchnorm():
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` (what ``--sync-bn`` does) replaces the BatchNorms the units'
    backward replays: each unit then takes the norm's output as it comes (the BatchNorm it was bound to is no
    longer called) and the training step gives the same loss and gradients. Outside torch.distributed a
    SyncBatchNorm normalises as BatchNorm does, so this runs on the CPU."""
    import copy

    import actlab

    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    actlab.convert(model, "iieu_b", example_input=torch.randn(2, 3, 8, 8))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == 2
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))
    losses = []
    for m in (model, synced):
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for (name, a), b in zip(synced.named_parameters(), model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
