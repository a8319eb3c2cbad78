"""One harness for every registered activation: a registered name is tested by being registered.

For each name and each input layout it accepts, a tiny site (producer -> norm -> activation) is built
with ``actlab.convert``; the converted activation is checked against the independent reference in
``references.py`` (values and float64 gradients), for dtype behaviour and a state_dict round trip.
"""
from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
import torch.nn as nn

import actlab
from actlab.activations import get_spec
import references as ref

# nhwc: a map stored channels last (B, H, W, C), as in the MLPs of ConvNeXt and Swin
LAYOUT_INPUTS = {"nchw": (3, 5, 6, 6), "nc": (3, 5), "nlc": (3, 7, 5), "nhwc": (3, 4, 3, 5)}


def make_site(layout: str, channels: int = 6) -> nn.Sequential:
    if layout == "nchw":
        return nn.Sequential(nn.Conv2d(5, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
    return nn.Sequential(nn.Linear(5, channels), nn.LayerNorm(channels), nn.ReLU())


def converted_site(name: str, layout: str, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    site = make_site(layout)
    if layout == "nchw":  # non-trivial running statistics for the eval-mode BN
        site[1].running_mean.uniform_(-0.5, 0.5)
        site[1].running_var.uniform_(0.5, 2.0)
    example = torch.randn(2, *LAYOUT_INPUTS[layout][1:])
    actlab.convert(site, name, num_classes=4, example_input=example, strict=True)
    # perturb learnable parameters away from their init so the reference sees non-trivial values
    with torch.no_grad():
        for p in site[2].parameters():
            if p.dim() and p.numel() > 1:
                p.add_(0.1 * torch.randn_like(p))
    return site.double().eval()


def reference_out(name: str, site: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    x_t = site[1](site[0](x))
    act = site[2]
    if name == "iieu_b":
        return ref.iieu_b(act, x_t, x, site[0])
    if x_t.dim() == 4 and isinstance(site[0], nn.Linear):  # channels last: the (B, C, H, W) reference
        return ref.REFERENCES[name](act, x_t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return ref.REFERENCES[name](act, x_t)


CASES = [(n, lay) for n in actlab.list_activations() for lay in get_spec(n).layouts]


def test_every_activation_has_a_reference():
    missing = [n for n in actlab.list_activations() if n not in ref.REFERENCES]
    assert not missing, f"register a reference in tests/references.py for {missing}"


@pytest.mark.parametrize("name,layout", CASES)
def test_matches_reference_values_and_gradients(name, layout):
    site = converted_site(name, layout)
    x = torch.randn(*LAYOUT_INPUTS[layout], dtype=torch.float64, requires_grad=True)
    out = site(x)
    expected = reference_out(name, site, x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # the inference path (plain ops, used by compile / export) must agree too
        torch.testing.assert_close(site(x), expected, rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(out)
    params = [x, *site.parameters()]
    got = torch.autograd.grad((out * weights).sum(), params, allow_unused=True)
    want = torch.autograd.grad((expected * weights).sum(), params, allow_unused=True)
    for p, g, w in zip(params, got, want):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name,layout", CASES)
def test_dtype_and_state_dict_round_trip(name, layout):
    site = converted_site(name, layout, seed=1).float()
    x = torch.randn(*LAYOUT_INPUTS[layout])
    out = site(x)
    assert out.dtype == torch.float32
    assert out.shape == site[1](site[0](x)).shape
    other = converted_site(name, layout, seed=2).float()
    if any(p.numel() for p in site[2].parameters()):
        assert not torch.allclose(other(x), out), "different seeds should give different parameters"
    other.load_state_dict(copy.deepcopy(site.state_dict()))
    torch.testing.assert_close(other(x), out, rtol=0, atol=0)


def test_registry_errors():
    with pytest.raises(KeyError, match="unknown activation 'relu7'"):
        actlab.create_activation("relu7")
    with pytest.raises(ValueError, match="per-channel state"):
        actlab.create_activation("prelu")
    from actlab.activations import ActivationSpec, register
    with pytest.raises(ValueError, match="already registered"):
        register(ActivationSpec("relu", nn.ReLU))
    with pytest.raises(ValueError, match="already registered"):
        register(ActivationSpec("my_act", nn.ReLU, aliases=("swish",)))
    assert "my_act" not in actlab.list_activations()


def test_aliases_and_case():
    assert isinstance(actlab.create_activation("Swish"), nn.SiLU)
    assert isinstance(actlab.create_activation("leaky-relu"), nn.LeakyReLU)
    assert set(actlab.list_activations()) >= {
        "relu", "leaky_relu", "prelu", "elu", "selu", "softplus", "gelu", "silu", "mish", "gdn", "acon_c",
        "meta_acon", "smu", "frelu", "dyrelu", "iieu_b", "dpa"}


@pytest.mark.parametrize("name", actlab.list_activations())
def test_each_activation_decides_its_sites_in_build(name):
    """``ActivationSpec.build`` is the one answer to "can it sit here": an unseen site, an unknown layout and
    a site without a producer are refused with a reason exactly where the spec says so."""
    from actlab.activations import Site, SiteMismatch
    spec = get_spec(name)
    conv = nn.Conv2d(5, 6, 3)
    seen = Site(6, "nchw", (2, 6, 4, 4), 2, producer=conv, num_classes=4)
    assert isinstance(spec.build(seen, {}), nn.Module)
    if spec.needs_channels:
        with pytest.raises(SiteMismatch, match="not called"):
            spec.build(None, {})
        with pytest.raises(SiteMismatch, match="does not take this input layout"):
            spec.build(Site(None, "5-d", (2, 6, 1, 4, 4), 2, producer=conv, num_classes=4), {})
    else:
        assert isinstance(spec.build(None, {}), nn.Module)
    orphan = Site(6, "nchw", (2, 6, 4, 4), 2, no_producer="its input is made by a residual add", num_classes=4)
    if spec.needs_producer:
        with pytest.raises(SiteMismatch, match="residual add"):
            spec.build(orphan, {})
    else:
        assert isinstance(spec.build(orphan, {}), nn.Module)


# ----------------------------------------------------------------------------- non-finite inputs

def _poisoned(layout: str) -> torch.Tensor:
    """A batch of three: a NaN in sample 0, +inf in sample 1, sample 2 finite."""
    x = torch.randn(*LAYOUT_INPUTS[layout])
    flat = x.view(x.shape[0], -1)
    flat[0, 3] = float("nan")
    flat[1, 1] = float("inf")
    return x


@pytest.mark.parametrize("name,layout", CASES)
def test_non_finite_inputs_stay_non_finite(name, layout):
    """No activation turns a NaN or inf into a finite value: what ReLU would propagate, it propagates."""
    site = converted_site(name, layout).float()  # eval: BatchNorm's running statistics keep samples apart
    out = site(_poisoned(layout))
    rows = out.reshape(out.shape[0], -1)
    assert not torch.isfinite(rows[0]).all(), "the NaN sample came out finite"
    assert not torch.isfinite(rows[1]).all(), "the inf sample came out finite"
    assert torch.isfinite(rows[2]).all(), "a finite sample came out non-finite"


def _kernel_modes():
    from actlab.activations.kernels import native

    modes = ["eager"]
    if native.available():
        modes.append("native")
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        modes.append("triton")
    return modes


@contextlib.contextmanager
def _kernels(mode: str):
    from actlab.activations import kernels

    kernels.set_kernels(mode)
    try:
        yield
    finally:
        kernels.set_kernels(os.environ.get("ACTLAB_KERNELS", "auto"))


def _train_step(name: str, layout: str, mode: str):
    site = converted_site(name, layout).float().train()
    x = _poisoned(layout).requires_grad_()
    y = torch.tensor([0, 1, 2])
    with _kernels(mode), actlab.targets(site, y):
        out = site(x)
        loss = out.sum() + actlab.dpa_loss(site)
        loss.backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("name,layout", [(n, lay) for n, lay in CASES if n in ("iieu_b", "dpa")])
def test_fused_kernels_propagate_non_finite_values_as_the_eager_ops(name, layout):
    """Training forward and backward on every kernel path: the same entries end up non-finite as on the
    plain PyTorch ops (nothing silently zeroed), forward and backward."""
    want_out, want_grad = _train_step(name, layout, "eager")
    assert not torch.isfinite(want_out).all()
    for mode in _kernel_modes()[1:]:
        got_out, got_grad = _train_step(name, layout, mode)
        assert torch.equal(torch.isfinite(got_out), torch.isfinite(want_out)), mode
        assert torch.equal(torch.isfinite(got_grad), torch.isfinite(want_grad)), mode


@pytest.mark.parametrize("layout", ["nchw", "nlc", "nhwc"])
def test_dpa_memories_never_take_non_finite_values(layout):
    """Five training steps (a memory update on the fifth) with a NaN sample and an inf sample in every
    batch: both memories stay finite on every kernel path, and the finite sample's class is learned."""
    for mode in _kernel_modes():
        torch.manual_seed(0)
        site = make_site(layout)
        actlab.convert(site, "dpa", num_classes=4, example_input=torch.randn(2, *LAYOUT_INPUTS[layout][1:]))
        site[1].eval()  # running statistics: the poisoned samples do not reach the finite one
        y = torch.tensor([0, 1, 2])
        with _kernels(mode):
            for _ in range(5):
                x = _poisoned(layout)
                with actlab.targets(site, y):
                    out = site(x)
                (out.nan_to_num().sum() + actlab.dpa_loss(site)).backward()
        dpa = site[2]
        for memory in (dpa.value_memory, dpa.grad_memory):
            assert torch.isfinite(memory).all(), mode
            assert memory[2].abs().sum() > 0, f"{mode}: the finite sample's class was not updated"
            assert memory[3].abs().sum() == 0, f"{mode}: a class without samples changed"


@pytest.mark.parametrize("name", ["acon_c", "meta_acon"])
def test_acon_swish_init_starts_as_swish(name):
    """init="swish": p1 = 1, p2 = 0, so the unit is x * sigmoid(beta * x); the default keeps the ACON
    authors' N(0, 1) draw; anything else is an error naming the choices."""
    torch.manual_seed(0)
    unit = actlab.create_activation(name, 6, init="swish")
    x = torch.randn(3, 6, 4, 4)
    beta = unit.beta.view(1, -1, 1, 1) if name == "acon_c" else \
        torch.sigmoid(unit.fc2(unit.fc1(x.mean((2, 3)))))[:, :, None, None]
    torch.testing.assert_close(unit(x), x * torch.sigmoid(beta * x))
    default = actlab.create_activation(name, 6)
    assert not torch.equal(default.p1, torch.ones(6)) and default.p1.std() > 0.1
    with pytest.raises(ValueError, match="init must be 'randn' or 'swish'"):
        actlab.create_activation(name, 6, init="zeros")


@pytest.mark.parametrize("name,layout", CASES)
def test_inference_mode_equals_no_grad_on_every_kernel_path(name, layout):
    """Under torch.inference_mode (timm's validate.py, Hugging Face pipelines) every activation gives
    exactly its no_grad output, in eval and in train mode (a train-mode model validated without autograd),
    on every kernel path."""
    site = converted_site(name, layout).float()
    x = torch.randn(*LAYOUT_INPUTS[layout])
    for mode in _kernel_modes():
        for training in (False, True):
            site.train(training)
            with _kernels(mode):
                with torch.no_grad():
                    want = site(x)
                with torch.inference_mode():
                    got = site(x)
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{mode}, training={training}")
