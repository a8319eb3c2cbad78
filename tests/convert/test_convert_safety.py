"""convert() changes nothing it does not say: modes kept, fx rewrites undone where nothing converts, all or
nothing on failure, settings checked, nested sites and empty conversions reported, scale check."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import actlab
from actlab.activations import registry


class Functional(nn.Module):
    """In-place functional calls, an unused in-place call and a training-only branch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        z = y * 2
        z.relu_()                      # unused result: the in-place change is the point
        y = F.relu(y, inplace=True)
        if self.training:
            y = y + 1
        return self.fc(F.gelu(y + z).mean((2, 3)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Functional()

    def forward(self, x):
        return self.body(x)


def _outputs(model, x):
    outs = []
    for training in (True, False):
        model.train(training)
        torch.manual_seed(0)
        outs.append(model(x.clone()))
    return outs


def test_convert_keeps_the_models_mode_and_dpa_runs_without_labels_in_eval():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    actlab.convert(model, "dpa", num_classes=10, example_input=torch.randn(2, 3, 32, 32))
    assert not any(m.training for m in model.modules())
    model(torch.randn(2, 3, 32, 32))  # eval-mode DPA is TAU: no targets needed
    model.train()
    actlab.convert(model, "iieu_b", example_input=torch.randn(2, 3, 32, 32))
    assert all(m.training for m in model.modules())


class Plain(nn.Module):
    """Functional activations without a training branch: an in-place call whose input is read later
    (it must stay as it is) and one whose input is not."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        z = y * 2
        z.relu_()                          # read again below: the in-place change is the point
        return F.relu(y, inplace=True) + z


def test_fx_rewrite_changes_nothing_where_nothing_converts():
    torch.manual_seed(0)
    model = nn.Sequential(Plain())
    inner = model[0]
    x = torch.randn(2, 3, 8, 8)
    want = model(x)
    actlab.convert(model, "gelu", example_input=x, exclude="*")
    assert model[0] is inner and type(model[0]) is Plain  # the very module, not an fx rewrite of it
    assert set(dict(inner.named_children())) == {"conv"}
    assert torch.equal(model(x), want)


def test_fx_rewrite_keeps_in_place_semantics_and_refuses_training_branches():
    torch.manual_seed(0)
    model = nn.Sequential(Plain())
    x = torch.randn(2, 3, 8, 8)
    want = model(x)
    actlab.convert(model, "relu", example_input=x)  # F.relu becomes a site; z.relu_() must stay a call
    report = actlab.conversion_report(model)
    assert [s.original for s in report.converted] == ["functional relu"]
    assert any("functional relu" in note for note in report.functional)  # z.relu_(), left as it is
    assert torch.equal(model(x), want)
    # a forward that branches on self.training is not rewritten (a trace would freeze one branch)
    torch.manual_seed(0)
    net = Net()
    want = _outputs(copy.deepcopy(net), x)  # a copy: train-mode forwards move BatchNorm's running statistics
    actlab.convert(net, "iieu_b", example_input=x)
    assert type(net.body) is Functional
    assert any("self.training" in note for note in actlab.conversion_report(net).functional)
    for got, expected in zip(_outputs(net, x), want):
        assert torch.equal(got, expected)


def test_a_failing_conversion_leaves_the_model_as_it_was(monkeypatch):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    before = {n: m for n, m in model.named_modules()}
    real_build = registry.ActivationSpec.build
    calls = []

    def failing(self, site, kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("boom at the fifth site")
        return real_build(self, site, kwargs)

    monkeypatch.setattr(registry.ActivationSpec, "build", failing)
    with pytest.raises(RuntimeError, match="boom"):
        actlab.convert(model, "iieu_b", example_input=x)
    assert {n: m for n, m in model.named_modules()} == before
    assert not any(isinstance(m, actlab.IIEUB) for m in model.modules())
    model.eval()
    model(x)  # no stale hooks of the half-built units


def test_activation_settings_must_be_finite():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"tau.*finite"):
        actlab.convert(model, "dpa", num_classes=3, example_input=torch.randn(2, 3, 8, 8), tau=float("nan"))
    assert isinstance(model[1], nn.ReLU)


def test_report_names_sites_inside_another_activation():
    from timm.models.metaformer import StarReLU

    model = nn.Sequential(nn.Linear(4, 8), StarReLU(), nn.Linear(8, 2))
    actlab.convert(model, "gelu", example_input=torch.randn(2, 4))
    [site] = actlab.conversion_report(model).converted
    assert site.name == "1.relu" and "inside StarReLU" in site.note
    assert "inside StarReLU" in str(actlab.conversion_report(model))


def test_a_conversion_that_finds_no_activation_warns_and_strict_raises():
    class Tanhish(nn.Module):
        def forward(self, x):
            return torch.tanh(x)

    model = nn.Sequential(nn.Linear(4, 8), Tanhish(), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match="called no activation that actlab recognises"):
        actlab.convert(model, "gelu", example_input=torch.randn(2, 4))
    with pytest.raises(ValueError, match="called no activation"):
        actlab.convert(model, "gelu", example_input=torch.randn(2, 4), strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        actlab.convert(model, "gelu", example_input=torch.randn(2, 4), act_types=(Tanhish,))


def test_check_names_sites_whose_scale_changed_tenfold():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                          nn.ReLU())
    x = torch.randn(4, 3, 12, 12)
    actlab.convert(model, "gelu", example_input=x)
    assert actlab.check(model, x) == []
    actlab.convert(model, "dpa", num_classes=3, example_input=x, include="5", tau=50.0)  # silences site 5
    flagged = actlab.check(model, x)
    assert [c.name for c in flagged] == ["5"] and flagged[0].ratio < 0.1
    assert model.training  # the check ran in eval mode and put the mode back


def test_check_names_the_sites_of_a_unit_that_blows_up_a_network_at_init():
    """timm's eca_nfnet_l0 (no BatchNorm) with Meta-ACON's N(0, 1) draw, which diverges in training:
    check() names the sites whose scale has grown tenfold over the original network's, compounding
    to above 100x in the last stage; with init="swish" none."""
    import timm

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for init, blown in (("randn", True), ("swish", False)):
        torch.manual_seed(0)
        model = timm.create_model("eca_nfnet_l0", pretrained=False, num_classes=10)
        actlab.convert(model, "meta_acon", example_input=x, init=init)
        flagged = actlab.check(model, x)
        assert bool(flagged) == blown, init
        if blown:
            assert flagged[0].ratio > 100 and flagged[0].name.startswith("stages.3")
