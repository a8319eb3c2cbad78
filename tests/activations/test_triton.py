"""The Triton kernels against the composite reference, on the geometries the C++ kernels are tested on.

Without a GPU they run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set in
conftest.py); on a GPU machine the same tests run the compiled kernels on CUDA tensors.
"""
from __future__ import annotations

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


@pytest.mark.parametrize("silent", [-1.0, 1e-6 * 7 ** 0.5], ids=["published", "silence"])
def test_rows_inverse_norms(silent):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 7, generator=g)
    x[0] = 0
    x[1] *= 0.8e-6 * 7 ** 0.5 / x[1].norm()  # just below the silencing norm
    x[2] *= 1.25e-6 * 7 ** 0.5 / x[2].norm()  # just above
    x = x.to(DEVICE)
    inv, sumsq = triton_kernels.rows_inv_norm(x, 1e-8, silent)
    want_inv, want_sumsq = composite.rows_inv_norm(x, 1e-8, silent)
    close(inv, want_inv)
    close(sumsq, want_sumsq)
    grad_inv = torch.randn(37, generator=g).to(DEVICE)
    close(triton_kernels.rows_inv_norm_backward(x, want_sumsq, grad_inv, 1e-8, silent),
          composite.rows_inv_norm_backward(x, want_sumsq, grad_inv, 1e-8, silent))


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
    for gv in (grad_v, None):
        got_grad = triton_kernels.tau_pool_backward(grad_out, passes, gv, tokens)
        close(got_grad, composite.tau_pool_backward(grad_out, passes, gv, tokens), dtype)
    assert torch.equal(got_grad[0, 0, :3], grad_out[0, 0, :3])  # the ties' gradient passed


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
