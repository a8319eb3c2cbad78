"""IIEU-B's planes layout of any spatial rank: every backend reads a conv map (B, C, H, W) with its
inverse patch norms (B, G, H, W) as it is, and gives the same numbers, in the same shapes, as for the
flattened planes (B, C, H * W), so the unit hands maps over without reshaping them."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

from actlab.activations.kernels import composite, native

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _backend(name):
    if name == "composite":
        return composite
    if name == "native":
        if DEVICE == "cuda" or not native.available():
            pytest.skip("the C++ kernels serve CPU tensors and are not built here")
        return native
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and Triton's interpreter is off")
    pytest.importorskip("triton")
    return importlib.import_module("actlab.activations.kernels.triton_kernels")


def _inputs(b=2, c=8, groups=2, hw=(5, 7)):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(b, c, *hw, generator=g)
    inv = torch.rand(b, groups, *hw, generator=g) + 0.2
    inv[0, :, 0] = 0  # silenced patches
    nu, inv_w, eta = torch.rand(b, c, generator=g), torch.rand(c, generator=g) + 0.5, torch.rand(c, generator=g) * 0.8
    go = torch.randn(x.shape, generator=g)
    terms = [torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.3,
             torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.3]
    return [t.to(DEVICE) for t in (x, inv, inv_w, nu, eta, go)], [t.to(DEVICE) for t in terms]


def _flat(t):
    return t.flatten(2)


def _same(got, want_flat, like):
    assert got.shape == like.shape
    torch.testing.assert_close(_flat(got), want_flat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["composite", "native", "triton"])
def test_maps_are_read_as_they_are(name):
    kernels = _backend(name)
    (x, inv, inv_w, nu, eta, go), terms = _inputs()
    _same(kernels.iieu_forward(x, inv, inv_w, nu, eta), kernels.iieu_forward(_flat(x), _flat(inv), inv_w, nu, eta), x)

    got = kernels.iieu_backward(go, x, inv, inv_w, nu, eta)
    want = kernels.iieu_backward(_flat(go), _flat(x), _flat(inv), inv_w, nu, eta)
    _same(got[0], want[0], x)
    _same(got[1], want[1], inv)
    for a, b in zip(got[2:], want[2:]):
        torch.testing.assert_close(a, b)

    stats = torch.cat([*terms, torch.randn(x.shape[:2], device=DEVICE).flatten(), nu.flatten(),
                       torch.zeros(x.shape[0], device=DEVICE), torch.ones(x.shape[0], device=DEVICE), inv_w, 1 / inv_w])
    _same(kernels.bn_site_forward(x, inv, eta, stats), kernels.bn_site_forward(_flat(x), _flat(inv), eta, stats), x)
    got = kernels.bn_site_backward(go, x, inv, eta, stats, inv_w, True)
    want = kernels.bn_site_backward(_flat(go), _flat(x), _flat(inv), eta, stats, inv_w, True)
    _same(got.c, want.c, x)
    _same(got.inv, want.inv, inv)
    for a, b in zip(got[2:], want[2:]):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    gap = torch.randn(x.shape[:2], device=DEVICE)
    mean, var = gap.mean(1, keepdim=True), gap.var(1, correction=0, keepdim=True)
    term_b = (go[:, :, 0, 0].contiguous(), nu, gap, mean, (var + 1e-5).rsqrt(), inv_w, eta)
    got_x, want_x = go.clone(), _flat(go).clone()
    got = kernels.term_b_backward_into_(got_x, *term_b, 0.5)
    want = kernels.term_b_backward_into_(want_x, *term_b, 0.5)
    _same(got_x, want_x, x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
