"""IIEU-B's unit as one operation (``actlab::iieu_unit``, the compiled training path): equal to the reference,
float64 gradcheck, and the operator contract (schema, fake kernel, aliasing) checked by torch.library.opcheck."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from actlab.activations import IIEUB
from actlab.activations.iieu import inverse_filter_norms
from actlab.activations.iieu.operation import iieu_unit_traced
from actlab.activations.iieu.patches import patches_key
import references as ref

SITES = {
    # name: (producer, x_pre shape)
    "3x3": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 5, 5)),
    "stride2_grouped": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 7, 7)),
    "depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), (2, 4, 5, 5)),  # norms recomputed in backward
    "1x1": (lambda: nn.Conv2d(4, 6, 1), (2, 4, 3, 3)),
    "tokens": (lambda: nn.Linear(4, 6), (2, 3, 4)),
    "rows": (lambda: nn.Linear(4, 6), (3, 4)),
}


def site(name: str, zero_patch: str = "silence"):
    torch.manual_seed(0)
    make, shape = SITES[name]
    producer = make().double()
    channels = producer.out_channels if isinstance(producer, nn.Conv2d) else producer.out_features
    unit = IIEUB(channels, producer=producer, capture=False, zero_patch=zero_patch).double()
    with torch.no_grad():
        unit.eta.uniform_(0.2, 0.6)  # both branches of the adjuster
        unit.norm.weight.uniform_(0.5, 1.5)
        unit.norm.bias.uniform_(-0.5, 0.5)
    x_pre = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    return producer, unit, x_pre


def operation(unit, producer, x_t, x_pre):
    inv_w = inverse_filter_norms(producer.weight, unit.eps)
    return iieu_unit_traced(x_t, x_pre, inv_w, unit.eta, unit.norm.weight, unit.norm.bias, unit.patches,
                            unit.patch_eps(), unit.zero_patch == "silence", unit.norm.eps)


@pytest.mark.parametrize("zero_patch", ["silence", "published"])
@pytest.mark.parametrize("name", list(SITES))
def test_operation_equals_the_reference_with_gradients(name, zero_patch):
    producer, unit, x_pre = site(name, zero_patch)
    if name == "3x3":
        with torch.no_grad():
            x_pre[0, :, :3, :3] = 0  # silenced (or published-rule) patches
    params = [x_pre, producer.weight, producer.bias, unit.eta, unit.norm.weight, unit.norm.bias]
    x_t = producer(x_pre)
    out = operation(unit, producer, x_t, x_pre)
    expected = ref.iieu_b(unit, x_t, x_pre, producer)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)
    w = torch.randn_like(out)
    got = torch.autograd.grad((out * w).sum(), params, retain_graph=True)  # x_t's graph serves both
    want = torch.autograd.grad((expected * w).sum(), params)
    for label, a, b in zip(["x_pre", "weight", "bias", "eta", "ln.weight", "ln.bias"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10, msg=lambda m: f"grad {label}: {m}")


@pytest.mark.parametrize("name", ["3x3", "depthwise", "tokens"])
def test_gradcheck_float64(name):
    producer, unit, x_pre = site(name)
    x_t = producer(x_pre).detach().requires_grad_()
    inv_w = inverse_filter_norms(producer.weight, unit.eps).detach().requires_grad_()
    eps, silence, ln_eps = unit.patch_eps(), True, unit.norm.eps

    def f(x_t, x_pre, inv_w, eta, ln_weight, ln_bias):
        return iieu_unit_traced(x_t, x_pre, inv_w, eta, ln_weight, ln_bias, unit.patches, eps, silence,
                                ln_eps)

    assert torch.autograd.gradcheck(f, (x_t, x_pre, inv_w, unit.eta, unit.norm.weight, unit.norm.bias))


@pytest.mark.parametrize("name,layout", [(name, layout) for name in ("3x3", "1x1", "stride2_grouped", "depthwise", "rows")
                                         for layout in ("contiguous", "channels_last")
                                         if not (name == "rows" and layout == "channels_last")])  # rows: no maps
def test_operator_contract(name, layout):
    """Schema, fake kernel (shapes, dtypes, strides: channels-last maps are taken and returned as they come),
    no aliasing, autograd registration, AOT dispatch."""
    producer, unit, x_pre = site(name)
    x_t = producer(x_pre).detach().float()
    x_pre = x_pre.detach().float()
    if layout == "channels_last":
        x_t, x_pre = x_t.contiguous(memory_format=torch.channels_last), x_pre.contiguous(memory_format=torch.channels_last)
    inv_w = inverse_filter_norms(producer.weight.float(), unit.eps).detach().requires_grad_()
    args = (x_t.requires_grad_(), x_pre.requires_grad_(), inv_w, unit.eta.float(), unit.norm.weight.float(),
            unit.norm.bias.float(), patches_key(unit.patches), unit.patch_eps(), True, unit.norm.eps)
    torch.library.opcheck(torch.ops.actlab.iieu_unit.default, args)


@pytest.mark.parametrize("name", ["3x3", "1x1", "stride2_grouped"])
def test_a_channels_last_producer_input_is_read_in_place(name, monkeypatch):
    """The compiler hands convolution maps over channels-last: the operation reads an ungrouped site's
    producer input as rows of its positions' channels, with no copy of it, returns that input's gradient
    channels-last, and gives what a contiguous input gives (a grouped site reads a contiguous copy)."""
    producer, unit, x_pre = site(name)
    x_t = producer(x_pre).detach()
    copied = []
    contiguous = torch.Tensor.contiguous

    def counting(t, *args, **kwargs):
        out = contiguous(t, *args, **kwargs)
        if out.data_ptr() != t.data_ptr() and t.data_ptr() == xp.data_ptr():
            copied.append(t.shape)
        return out

    monkeypatch.setattr(torch.Tensor, "contiguous", counting)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        xt = x_t.contiguous(memory_format=layout).requires_grad_()
        xp = x_pre.detach().contiguous(memory_format=layout).requires_grad_()
        copied.clear()
        out = operation(unit, producer, xt, xp)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), [xt, xp])
        results.append((out, *grads))
    assert (not copied) == (producer.groups == 1)  # counted for the channels-last input
    assert grads[1].is_contiguous(memory_format=torch.channels_last) and grads[0].stride() == xt.stride()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
