"""Dynamic Coupler against a reference written from the formulas."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import actlab


def reference(dc, main, shortcut):
    c = dc.channels
    pool = (lambda t: t.mean((2, 3))) if main.dim() == 4 else (lambda t: t.mean(1))
    a = F.layer_norm(torch.cat([pool(main), pool(shortcut)], 1), (2 * c,), dc.in_norm.weight, dc.in_norm.bias, 1e-6)
    rows = []
    w1 = dc.fc1.weight
    inv_w = 1 / (w1.norm(dim=1) + 1e-8)
    for i in range(2):
        a_i = a[:, i * c:(i + 1) * c]
        h = a_i @ w1.T
        inv_x = 1 / (a_i.norm(dim=1, keepdim=True) + 1e-8)
        # the published normaliser: unbiased standard deviation plus 1e-6
        centered = h - h.mean(1, keepdim=True)
        std = torch.sqrt(centered.square().sum(1, keepdim=True) / (h.shape[1] - 1))
        ln = centered / (std + 1e-6) * dc.act.norm_weight[i] + dc.act.norm_bias[i]
        rho = h * inv_w * inv_x + torch.sigmoid(ln)
        eta = dc.act.eta
        s = torch.where(rho >= eta, rho, eta * torch.exp(torch.clamp(rho - eta, max=0)))
        rows.append((s * h) @ dc.fc2.weight.T)
    z = F.layer_norm(torch.cat(rows, 1), (2 * c,), dc.out_norm.weight, dc.out_norm.bias, 1e-6)
    lam = torch.softmax(z.view(-1, 2, c), dim=1)
    view = (lambda t: t[:, :, None, None]) if main.dim() == 4 else (lambda t: t[:, None, :])
    return view(lam[:, 0]) * main + view(lam[:, 1]) * shortcut


def perturbed(channels=32, reduction=4):
    torch.manual_seed(0)
    dc = actlab.DynamicCoupler(channels, reduction).double()
    with torch.no_grad():  # move away from init so the softmax is not ~0.5 everywhere
        for p in (dc.out_norm.weight, dc.act.norm_weight, dc.in_norm.weight):
            p.uniform_(0.5, 2.0)
        dc.act.eta.fill_(0.8)  # both branches of the adjuster
    return dc


@pytest.mark.parametrize("shape", [(3, 32, 5, 5), (3, 7, 32)], ids=["maps", "tokens"])
def test_matches_reference(shape):
    dc = perturbed()
    main = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    shortcut = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    out, expected = dc(main, shortcut), reference(dc, main, shortcut)
    torch.testing.assert_close(out, expected)
    params = [main, shortcut, *dc.parameters()]
    w = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad((out * w).sum(), params), torch.autograd.grad((expected * w).sum(), params)):
        torch.testing.assert_close(g, r)
    lam = dc.weights(main, shortcut)
    assert lam.min() < 0.3 and lam.max() > 0.7  # the perturbed coupler really mixes unevenly


def test_gradcheck_through_the_coupler():
    dc = perturbed(channels=16, reduction=4)
    main = torch.randn(2, 16, 3, 3, dtype=torch.float64, requires_grad=True)
    shortcut = torch.randn(2, 16, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dc, (main, shortcut))


def test_init_is_about_half_half():
    torch.manual_seed(1)
    dc = actlab.DynamicCoupler(64)
    lam = dc.weights(torch.randn(8, 64, 4, 4) * 3, torch.randn(8, 64, 4, 4))
    torch.testing.assert_close(lam.sum(1), torch.ones(8, 64))
    assert (lam - 0.5).abs().max() < 0.05
    assert dc.fc1.weight.shape == (4, 64) and dc.fc1.bias is None and dc.fc2.bias is None
    assert math.isclose(dc.fc1.weight.std().item(), math.sqrt(2 / 4), rel_tol=0.2)  # kaiming normal, fan_out
    assert torch.equal(dc.act.eta, torch.full((4,), 0.01))


def test_errors_and_bf16():
    dc = actlab.DynamicCoupler(8, reduction=2)
    with pytest.raises(ValueError, match="differ"):
        dc(torch.randn(2, 8, 3, 3), torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="expected 8 channels"):
        dc(torch.randn(2, 6, 3, 3), torch.randn(2, 6, 3, 3))
    main, short = torch.randn(4, 8, 5, 5), torch.randn(4, 8, 5, 5)
    ref32 = dc(main, short)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dc(main.bfloat16(), short.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref32).norm() / ref32.norm() < 2e-2


def test_fusion_keeps_no_map_beyond_what_the_network_keeps():
    """In a residual chain the coupler's weighted sum saves its output (the next conv's input) and the
    identity shortcut (this block's conv input), not the main branch: saved bytes stay within the
    plain add's plus the coupler's small per-channel tensors."""
    from actlab.perf.timing import saved_bytes

    torch.manual_seed(0)
    convs = [nn.Conv2d(16, 16, 3, padding=1, bias=False) for _ in range(3)]
    couplers = [actlab.DynamicCoupler(16, reduction=4) for _ in range(3)]
    x = torch.randn(4, 16, 16, 16, requires_grad=True)

    def chain(fuse):
        def run():
            h = x
            for conv, coupler in zip(convs, couplers):
                h = fuse(coupler, conv(h), h)
            return h.square().mean()
        return run

    plain = saved_bytes(chain(lambda coupler, main, shortcut: main + shortcut))
    coupled = saved_bytes(chain(lambda coupler, main, shortcut: coupler(main, shortcut)))
    map_bytes = x.numel() * 4
    assert coupled <= plain + 0.5 * map_bytes, (coupled, plain, map_bytes)
    naive = saved_bytes(chain(lambda coupler, main, shortcut: coupler.weights(main, shortcut)[:, 0, :, None, None] * main
                              + coupler.weights(main, shortcut)[:, 1, :, None, None] * shortcut))
    assert naive >= coupled + 2 * map_bytes  # keeping main and shortcut would cost maps: the test measures something


@pytest.mark.parametrize("layout", ["maps", "channels_last", "tokens"])
def test_float32_training_path_matches_the_plain_ops(layout, monkeypatch):
    """The eager training path (C++ kernels for contiguous float32 maps, the weight network's gradient
    folded into the branches' pass) against the plain tensor ops with autograd, frozen parameters
    included."""
    torch.manual_seed(5)
    dc = actlab.DynamicCoupler(16, reduction=4)
    with torch.no_grad():
        dc.out_norm.weight.uniform_(0.5, 2.0)
    dc.in_norm.bias.requires_grad_(False)
    shape = (3, 9, 16) if layout == "tokens" else (3, 16, 5, 7)
    main, shortcut = torch.randn(shape), torch.randn(shape)
    if layout == "channels_last":
        main, shortcut = (t.contiguous(memory_format=torch.channels_last) for t in (main, shortcut))
    weight = torch.randn(shape)
    params = [p for p in dc.parameters() if p.requires_grad]
    results = []
    for plain in (False, True):
        m, s = main.clone().requires_grad_(), shortcut.clone().requires_grad_()
        if plain:  # what forward computes outside eager training, differentiated by autograd
            lam = dc.weights(m, s)
            view = (lambda t: t[:, None, :]) if layout == "tokens" else (lambda t: t[:, :, None, None])
            out = view(lam[:, 0]) * m + view(lam[:, 1]) * s
        else:
            out = dc(m, s)
        results.append((out, *torch.autograd.grad((out * weight).sum(), [m, s, *params])))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert dc.in_norm.bias.grad is None


def test_row_normaliser_is_the_published_one():
    """Each row: (h - mean) / (unbiased std + 1e-6), which differs from LayerNorm by sqrt(n / (n - 1))
    (1.41x at n = 2); float64 gradcheck; one feature (hidden width 1) gives 0, not NaN."""
    from actlab.activations.coupler import row_standardize

    torch.manual_seed(0)
    h = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    want = (h - h.mean(-1, keepdim=True)) / (torch.std(h, -1, keepdim=True) + 1e-6)
    torch.testing.assert_close(row_standardize(h), want)
    pair = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(row_standardize(pair), torch.tensor([[-1.0, 1.0]], dtype=torch.float64) / (2 ** 0.5 + 1e-6))
    assert torch.autograd.gradcheck(row_standardize, (h,))
    single = actlab.DynamicCoupler(8, reduction=8)  # hidden width 1
    out = single(torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(actlab.DynamicCoupler(16, reduction=4, eta_init=0.05).act.eta, torch.full((4,), 0.05))


def test_compiled_training_is_one_operation_with_the_eager_gradients():
    """Under torch.compile (fullgraph) the coupler is the kernel layer's one operation with its gradient
    formula (the compiler generates no code for the weight network): output and every gradient as in
    eager training."""
    dc = perturbed(channels=16, reduction=4).float()
    main, shortcut = torch.randn(3, 16, 5, 5), torch.randn(3, 16, 5, 5)
    weight = torch.linspace(-1, 1, main.numel()).view_as(main)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    results = []
    for forward in (dc, torch.compile(dc, fullgraph=True), torch.compile(dc, backend=record, fullgraph=True)):
        dc.zero_grad(set_to_none=True)
        m, s = main.clone().requires_grad_(), shortcut.clone().requires_grad_()
        out = forward(m, s)
        (out * weight).sum().backward()
        results.append([out, m.grad, s.grad, *(p.grad for p in dc.parameters())])
    for compiled in results[1:]:
        for got, want in zip(compiled, results[0], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert "actlab.coupler" in targets, targets
    assert not any("layer_norm" in t or "softmax" in t for t in targets)
