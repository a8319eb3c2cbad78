"""actlab.convert on torchvision, timm and hand-written models."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import actlab
from actlab.activations import DPA, IIEUB, ActivationModule
from actlab.convert import RECORD_KEY, SiteSplit

TORCHVISION = {"resnet18": 64, "resnet50": 64, "mobilenet_v2": 64, "vgg11_bn": 32, "shufflenet_v2_x1_0": 64}
TIMM = {
    "resnet26": ({}, 64),
    "vit_tiny_patch16_224": ({"img_size": 32, "patch_size": 8}, 32),
    "cait_xxs24_224": ({"img_size": 32, "patch_size": 8, "depth": 4}, 32),
    "pvt_v2_b0": ({}, 64),
    "tnt_s_patch16_224": ({"img_size": 32, "patch_size": 8, "depth": 3}, 32),
}
# (sites converted by iieu_b, all activation sites); regression figures from the architectures
EXPECTED_SITES = {
    "resnet18": (9, 17), "resnet50": (33, 49), "mobilenet_v2": (35, 35), "vgg11_bn": (10, 10),
    "shufflenet_v2_x1_0": (37, 37), "resnet26": (17, 25), "vit_tiny_patch16_224": (12, 12),
    "cait_xxs24_224": (6, 6), "pvt_v2_b0": (8, 8), "tnt_s_patch16_224": (6, 6),
}


def build(name: str):
    torch.manual_seed(0)
    if name in TORCHVISION:
        return getattr(torchvision.models, name)(num_classes=10), TORCHVISION[name]
    kwargs, size = TIMM[name]
    return timm.create_model(name, num_classes=10, **kwargs), size


def activation_modules(model):
    return [m for m in model.modules() if isinstance(m, (ActivationModule, nn.ReLU, nn.ReLU6, nn.GELU))]


@pytest.mark.parametrize("name", list(EXPECTED_SITES))
@pytest.mark.parametrize("act", ["iieu_b", "dpa"])
def test_model_zoo_converts_and_trains(name, act):
    model, size = build(name)
    x = torch.randn(2, 3, size, size)
    actlab.convert(model, act, num_classes=10, example_input=x, interval=1) if act == "dpa" else \
        actlab.convert(model, act, example_input=x)
    report = actlab.conversion_report(model)
    iieu_sites, all_sites = EXPECTED_SITES[name]
    assert len(report.converted) == (iieu_sites if act == "iieu_b" else all_sites), str(report)
    assert len(report.sites) == all_sites
    for kept in report.kept:
        assert kept.reason, kept
    new_type = IIEUB if act == "iieu_b" else DPA
    units = [m for m in model.modules() if isinstance(m, new_type)]
    assert len(units) == len(report.converted)
    assert len({id(m) for m in activation_modules(model)}) == len(activation_modules(model))

    model.train()
    y = torch.tensor([3, 7])
    with actlab.targets(model, y):
        out = model(x)
    loss = F.cross_entropy(out, y) + actlab.dpa_loss(model)
    loss.backward()
    assert out.shape == (2, 10) and torch.isfinite(loss)
    if act == "iieu_b":
        assert all(u.eta.grad is not None and torch.isfinite(u.eta.grad).all() for u in units)
        # eta only gets gradient where rho < eta (rare at init); term-B's LayerNorm does wherever the branch
        # is live (timm zero-initialises the last BN of each residual branch, which silences that branch)
        assert all(torch.isfinite(u.norm.weight.grad).all() for u in units)
        assert any(float(u.norm.weight.grad.abs().sum()) > 0 for u in units)
    else:
        assert all(u.value_memory[3].abs().sum() > 0 for u in units), "interval=1: every site updated"
        assert all(u.grad_memory[7].abs().sum() > 0 for u in units)


def test_resnet_shared_relu_is_split_per_call():
    model = torchvision.models.resnet18(num_classes=10)
    actlab.convert(model, "iieu_b", example_input=torch.randn(2, 3, 32, 32))
    split = model.layer1[0].relu
    assert isinstance(split, SiteSplit) and len(split.sites) == 2
    assert isinstance(split.sites[0], IIEUB) and split.sites[0].producer is model.layer1[0].conv1
    assert isinstance(split.sites[1], nn.ReLU)  # after the residual add: no producer, kept
    report = actlab.conversion_report(model)
    kept = {s.name: s.reason for s in report.kept}
    assert "residual add" in kept["layer1.0.relu[1]"]
    assert "layer1.0.relu[0]" in {s.name for s in report.converted}
    assert "layer1.0.conv1 -> layer1.0.bn1" in str(report)
    # the state_dict reads plainly
    keys = model.state_dict().keys()
    assert "layer1.0.relu.sites.0.eta" in keys and "layer1.0.relu.sites.0.norm.weight" in keys
    assert "bn1.weight" in keys and "relu.eta" in keys


def test_each_site_gets_its_own_module_for_baselines():
    model = torchvision.models.resnet18(num_classes=10)
    actlab.convert(model, "prelu", example_input=torch.randn(2, 3, 32, 32))
    prelus = [m for m in model.modules() if isinstance(m, nn.PReLU)]
    assert len(prelus) == 17 and len({id(p) for p in prelus}) == 17
    assert prelus[0].weight.shape == (64,)
    model(torch.randn(2, 3, 32, 32)).sum().backward()


def test_include_and_exclude_patterns():
    model = torchvision.models.resnet18(num_classes=10)
    actlab.convert(model, "gelu", include="layer4.*", exclude="layer4.1.*", example_input=torch.randn(2, 3, 32, 32))
    report = actlab.conversion_report(model)
    assert sorted(s.name for s in report.converted) == ["layer4.0.relu[0]", "layer4.0.relu[1]"]
    assert {s.reason for s in report.kept} == {"not matched by include", "excluded by pattern"}
    assert isinstance(model.relu, nn.ReLU)


def test_dpa_token_pooling_follows_the_model():
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8)
    actlab.convert(vit, "dpa")  # num_classes from the model, example input sized from patch_embed
    assert {m.token_pool for m in vit.modules() if isinstance(m, DPA)} == {"cls"}
    avg = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, global_pool="avg")
    actlab.convert(avg, "dpa")
    assert {m.token_pool for m in avg.modules() if isinstance(m, DPA)} == {"mean"}
    tnt = timm.create_model("tnt_s_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=2)
    actlab.convert(tnt, "dpa")
    pools = {n: m.token_pool for n, m in tnt.named_modules() if isinstance(m, DPA)}
    assert pools["blocks.0.mlp_in.act"] == "mean" and pools["blocks.0.mlp.act"] == "cls"
    rows = {n: m.rows_per_sample for n, m in tnt.named_modules() if isinstance(m, DPA)}
    assert rows["blocks.0.mlp_in.act"] == 16 and rows["blocks.0.mlp.act"] == 1  # inner blocks: one row per patch
    tnt.train()
    y = torch.tensor([1, 7])
    with actlab.targets(tnt, y):
        tnt(torch.randn(2, 3, 32, 32)).sum().backward()
    with pytest.raises(ValueError, match=r"blocks.0.mlp_in.act'?: the targets hold 1 labels x 16 rows per sample"):
        with actlab.targets(tnt, y[:1]):
            tnt(torch.randn(2, 3, 32, 32))


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        x = self.act(self.conv(x))
        return self.lin(F.gelu(x.mean((2, 3))))


def test_functional_activations_are_reported_not_lost():
    model = actlab.convert(FunctionalNet(), "silu", example_input=torch.randn(2, 3, 8, 8))
    report = actlab.conversion_report(model)
    assert isinstance(model.act, nn.SiLU)
    assert report.functional == ["the model's forward: functional gelu (not a module; left as is): the model is "
                                 "converted in place, so its own forward keeps them"]
    assert "not seen" in str(report)


class ReluOnlyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv(x)).mean((2, 3))


@pytest.mark.parametrize("model,include,problem", [
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), None, "the example forward called no activation module"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), "layer9.*", r"include='layer9.\*' matched none of the 1 site"),
    (ReluOnlyNet(), None, "the example forward called no activation module; 1 functional activation"),
], ids=["no-activations", "include-matches-nothing", "functional-only"])
def test_strict_refuses_a_conversion_that_does_nothing(model, include, problem):
    with pytest.raises(ValueError, match=rf"convert\(strict=True\): {problem}"):
        actlab.convert(model, "silu", include=include, example_input=torch.randn(2, 3, 8, 8), strict=True)
    actlab.convert(model, "silu", include=include, example_input=torch.randn(2, 3, 8, 8))  # not strict: a report


def test_reconverting_keeps_trained_parameters_and_hooks_clean():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    example = torch.randn(2, 3, 8, 8)
    actlab.convert(model, "iieu_b", example_input=example, strict=True)
    unit = model[2]
    with torch.no_grad():
        unit.eta.fill_(0.3)  # as if trained
    actlab.convert(model, "iieu_b", example_input=example, strict=True)
    assert model[2] is unit and torch.all(unit.eta == 0.3)
    assert "already this activation" in str(actlab.conversion_report(model))
    report = actlab.conversion_report(model)
    assert len(report.converted) == 0 and len(report.active) == 1  # the site still runs IIEU-B
    assert len(model[0]._forward_pre_hooks) == 1  # the unused twin built on the way left no hook behind
    actlab.convert(model, "iieu_b", example_input=example, zero_patch="published")  # other settings: replaced
    assert model[2] is not unit and model[2].zero_patch == "published" and len(model[0]._forward_pre_hooks) == 1
    actlab.convert(model, "dpa", num_classes=3, example_input=example, strict=True)
    assert isinstance(model[2], DPA) and len(model[0]._forward_pre_hooks) == 0


def test_activation_inside_a_norm_module():
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8, act_layer=nn.ReLU))
    actlab.convert(model, "iieu_b", example_input=torch.randn(2, 3, 8, 8), strict=True)
    unit = model[1].act
    assert isinstance(unit, IIEUB) and unit.producer is model[0]
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert unit.eta.grad is not None


class Interleaved(nn.Module):
    """One conv applied twice before either activation runs: the first activation's producer input
    was overwritten, so that site must be refused."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.act_a, self.act_b = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        a, b = self.conv(x), self.conv(-x)
        return self.act_a(a) + self.act_b(b)


def test_producer_called_again_before_activation_is_refused():
    model = actlab.convert(Interleaved(), "iieu_b", example_input=torch.randn(2, 3, 6, 6))
    report = actlab.conversion_report(model)
    assert [s.name for s in report.converted] == ["act_b"]
    assert "called again" in report.kept[0].reason


def test_clear_errors():
    model = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(KeyError, match="unknown activation 'iieu_x'"):
        actlab.convert(model, "iieu_x", example_input=torch.randn(2, 3, 32, 32))
    with pytest.raises(RuntimeError, match="example forward failed on input shapes \\[\\(2, 5\\)\\]"):
        actlab.convert(model, "gelu", example_input=torch.randn(2, 5))
    with pytest.raises(ValueError, match="strict=True.*8 site"):
        actlab.convert(model, "iieu_b", example_input=torch.randn(2, 3, 32, 32), strict=True)
    with pytest.raises(ValueError, match="not converted by actlab"):
        actlab.conversion_report(nn.Linear(2, 2))


def test_frelu_refuses_token_sites_with_a_reason():
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=2)
    actlab.convert(vit, "frelu")
    report = actlab.conversion_report(vit)
    assert not report.converted and all("layout" in s.reason for s in report.kept)


class TokensFromConv(nn.Module):
    """PVT-v2's MLP pattern: a conv's output is handed to the activation as tokens."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.conv(x).flatten(2).transpose(1, 2))


def test_conv_output_seen_as_tokens_is_an_iieu_site():
    import references as ref

    torch.manual_seed(0)
    model = actlab.convert(TokensFromConv(), "iieu_b", example_input=torch.randn(2, 4, 5, 5), strict=True).double()
    unit = model.act
    with torch.no_grad():
        unit.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    out = model(x)
    expected = ref.iieu_b(unit, model.conv(x), x, model.conv).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    w = torch.randn_like(out)
    got = torch.autograd.grad((out * w).sum(), [x, model.conv.weight])
    want = torch.autograd.grad((expected * w).sum(), [x, model.conv.weight])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


class TokensAfterTensorCode(TokensFromConv):
    def forward(self, x):
        return self.act(self.conv(x).flatten(2).transpose(1, 2) * 2)


def test_modified_token_view_is_not_a_site():
    model = actlab.convert(TokensAfterTensorCode(), "iieu_b", example_input=torch.randn(2, 4, 5, 5))
    assert not actlab.conversion_report(model).converted


def test_reconverting_removes_stale_hooks():
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    actlab.convert(model, "iieu_b", example_input=x)
    old_units = [m for m in model.modules() if isinstance(m, IIEUB)]
    assert len(model.conv1._forward_pre_hooks) == 1
    actlab.convert(model, "dpa", num_classes=10, example_input=x)
    assert all(u.producer is None for u in old_units)
    assert len(model.conv1._forward_pre_hooks) == 0 and len(model.bn1._forward_hooks) == 0
    assert len(model.layer1[0]._forward_pre_hooks) == 1  # the new split's reset hook only
    assert len(actlab.conversion_report(model).converted) == 17
    model.eval()
    model(x)


class ListCaller(nn.Module):
    """Calls an activation held in a ModuleList twice per forward, indexing the list (never calling it)."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)])
        self.acts = nn.ModuleList([nn.ReLU()])

    def forward(self, x):
        for conv in self.convs:
            x = self.acts[0](conv(x))
        return x


def test_activation_reached_through_a_module_list_is_split_with_a_working_reset():
    model = actlab.convert(ListCaller(), "iieu_b", example_input=torch.randn(2, 3, 4, 4), strict=True)
    split = model.acts[0]
    assert isinstance(split, SiteSplit) and [u.producer for u in split.sites] == list(model.convs)
    for _ in range(3):  # the counter is reset by the running module on every forward
        model(torch.randn(2, 3, 4, 4)).sum().backward()


def test_torchvision_vit_pools_its_class_token_and_the_report_says_so():
    from torchvision.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                            num_classes=10)
    actlab.convert(vit, "dpa", num_classes=10, example_input=torch.randn(2, 3, 32, 32), strict=True)
    sites = [m for m in vit.modules() if isinstance(m, DPA)]
    assert len(sites) == 2 and {m.token_pool for m in sites} == {"cls"}
    assert str(actlab.conversion_report(vit)).count("(pools the class token)") == 2
    vit.train()
    with actlab.targets(vit, torch.tensor([3, 4])):
        vit(torch.randn(2, 3, 32, 32)).sum().backward()


def test_a_conversion_that_keeps_most_sites_warns_and_one_that_converts_them_does_not():
    with pytest.warns(UserWarning, match=r"only 0 of 1 activation calls converted \(1 x functional activation"):
        actlab.convert(ReluOnlyNet(), "silu", example_input=torch.randn(2, 3, 8, 8))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2), nn.ReLU())
    model(torch.randn(2, 3, 8, 8))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        actlab.convert(model, "iieu_b", example_input=torch.randn(2, 3, 8, 8))  # 2 of 2: no warning


class ChannelsLastBlock(nn.Module):
    """A ConvNeXt block: depthwise conv, then a LayerNorm and an MLP on the map stored channels last."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):  # (B, C, H, W)
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))  # (B, H, W, C)
        y = self.fc2(self.act(self.fc1(y)))
        return x + y.permute(0, 3, 1, 2)


class ChannelsLastNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_act = nn.ReLU()
        self.block = ChannelsLastBlock()
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.block(self.stem_act(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("act", ["iieu_b", "dpa", "meta_acon", "dyrelu", "prelu"])
def test_channels_last_maps_are_sites(act):
    """A Linear on a (B, H, W, C) map (ConvNeXt, Swin) is a site with its channels last; the conv site
    before it stays a (B, C, H, W) site. Both train."""
    torch.manual_seed(0)
    model = ChannelsLastNet()
    x = torch.randn(3, 3, 6, 5)
    actlab.convert(model, act, num_classes=5, example_input=x[:2], strict=True)
    mlp_act, stem_act = model.block.act, model.stem_act
    if act == "iieu_b":
        assert mlp_act.producer is model.block.fc1 and stem_act.producer is model.stem
    else:
        assert mlp_act.nhwc and not stem_act.nhwc
        assert mlp_act.extra_repr().endswith("nhwc=True")
    model.train()
    with actlab.targets(model, torch.tensor([0, 4, 2])):
        out = model(x)
    (out.sum() + actlab.dpa_loss(model)).backward()
    new_params = [p for m in (mlp_act, stem_act) for p in m.parameters()]
    assert new_params or act == "dpa"
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in new_params)


def test_dpa_pools_a_channels_last_map_over_its_positions():
    """DPA's memory after one update holds alpha * the (H, W) mean of the sample's (B, H, W, C) input."""
    torch.manual_seed(0)
    model = ChannelsLastNet()
    x = torch.randn(3, 3, 6, 5)
    actlab.convert(model, "dpa", num_classes=5, example_input=x[:2], interval=1, alpha=0.5)
    block, dpa = model.block, model.block.act
    model.train()
    with actlab.targets(model, torch.tensor([0, 4, 2])):
        model(x).sum().backward()
    with torch.no_grad():
        hidden = block.fc1(block.norm(block.dwconv(model.stem_act(model.stem(x))).permute(0, 2, 3, 1)))
    torch.testing.assert_close(dpa.value_memory[[0, 4, 2]], 0.5 * hidden.mean((1, 2)))
    assert torch.count_nonzero(dpa.value_memory[[1, 3]]) == 0


class InPlaceAfterSites(nn.Module):
    """Every kind of site, each followed by an in-place operation: conv map (Dropout2d(inplace=True)),
    flat features (Dropout(inplace=True), as mobilenet_v3's classifier), tokens and a channels-last map
    (an in-place add)."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.in_place = in_place
        self.conv, self.bn, self.conv_act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv_drop = nn.Dropout2d(0.5, inplace=in_place)
        self.tok, self.tok_act = nn.Linear(8, 8), nn.ReLU()
        self.nhwc, self.nhwc_act = nn.Linear(8, 8), nn.ReLU()
        self.fc, self.fc_act = nn.Linear(8, 8), nn.ReLU()
        self.drop = nn.Dropout(0.5, inplace=in_place)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv_drop(self.conv_act(self.bn(self.conv(x))))  # (B, 8, H, W)
        t = self.tok_act(self.tok(x.flatten(2).transpose(1, 2)))  # tokens (B, HW, 8)
        t = t.mul_(2.0) if self.in_place else t * 2.0
        m = self.nhwc_act(self.nhwc(x.permute(0, 2, 3, 1)))  # channels last (B, H, W, 8)
        m = m.add_(1.0) if self.in_place else m + 1.0
        f = self.drop(self.fc_act(self.fc(t.mean(1) + m.mean((1, 2)))))
        return self.head(f)


@pytest.mark.parametrize("act", ["iieu_b", "dpa"])
def test_in_place_operations_after_every_kind_of_site(act):
    """Training through an in-place operation right after a site works and gives the gradients of the
    same model with out-of-place operations (same dropout masks)."""
    grads = []
    for in_place in (True, False):
        torch.manual_seed(0)
        model = InPlaceAfterSites(in_place)
        x = torch.randn(4, 3, 5, 5)
        actlab.convert(model, act, num_classes=4, example_input=x[:2], strict=True, **({"interval": 1} if act == "dpa" else {}))
        assert len(actlab.conversion_report(model).converted) == 4
        model.train()
        torch.manual_seed(1)
        with actlab.targets(model, torch.tensor([0, 1, 2, 3])):
            out = model(x)
        loss = out.square().sum() + actlab.dpa_loss(model)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class Mlp(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SharedMlpBlock(nn.Module):
    """timm coat's parallel block: one Mlp object registered as mlp2, mlp3 and mlp4, run on three token
    sets of different lengths."""

    def __init__(self):
        super().__init__()
        self.mlp2 = Mlp()
        self.mlp3 = self.mlp2
        self.mlp4 = self.mlp2

    def forward(self, a, b, c):
        return self.mlp2(a).mean(1) + self.mlp3(b).mean(1) + self.mlp4(c).mean(1)


class SharedMlpNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.block = SharedMlpBlock()
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, 16, 8)
        return self.head(self.block(t, t[:, :9], t[:, :4]))


def test_a_shared_module_is_one_site_per_call_and_its_other_names_are_aliases():
    torch.manual_seed(0)
    model = SharedMlpNet()
    x = torch.randn(3, 3, 8, 8)
    actlab.convert(model, "dpa", num_classes=5, example_input=x[:2], interval=1, alpha=0.5, strict=True)
    report = actlab.conversion_report(model)
    assert [s.name for s in report.sites] == [f"block.mlp2.act[{k}]" for k in range(3)]
    assert report.aliases == [("block.mlp3.act", "block.mlp2.act"), ("block.mlp4.act", "block.mlp2.act")]
    assert "alias      block.mlp3.act" in str(report)
    split = model.block.mlp2.act
    assert isinstance(split, SiteSplit) and model.block.mlp4.act is split
    sites = list(split.sites)
    assert len({id(s) for s in sites}) == 3 and all(isinstance(s, DPA) for s in sites)
    model.train()
    y = torch.tensor([0, 3, 1])
    for _ in range(2):  # the split's call counter restarts with every forward of the block
        with actlab.targets(model, y):
            model(x).sum().backward()
    with torch.no_grad():
        t = model.embed(x).flatten(2).transpose(1, 2)
        for site, tokens in zip(sites, (t, t[:, :9], t[:, :4])):
            mean = model.block.mlp2.fc1(tokens).mean(1)  # the call's own pre-activation, pooled
            torch.testing.assert_close(site.value_memory[[0, 3, 1]], 0.75 * mean, rtol=1e-5, atol=1e-6)


def test_reconverting_a_shared_module_keeps_its_aliases_out_of_the_sites():
    model = SharedMlpNet()
    x = torch.randn(2, 3, 8, 8)
    actlab.convert(model, "meta_acon", example_input=x)
    actlab.convert(model, "iieu_b", example_input=x, strict=True)
    report = actlab.conversion_report(model)
    assert len(report.sites) == 3 and len(report.converted) == 3
    units = list(model.block.mlp2.act.sites)
    assert all(isinstance(u, IIEUB) and u.producer is model.block.mlp2.fc1 for u in units)
    model.train()
    model(x).sum().backward()
    assert all(u.eta.grad is not None for u in units)


class GatedMlp(nn.Module):
    """timm's GluMlp (eva02's SwiGLU): fc1's output split in two halves, one through the activation."""

    def __init__(self, gate_last: bool, dim: int = 6, hidden: int = 5):
        super().__init__()
        self.gate_last = gate_last
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * hidden), nn.SiLU(), nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(x1 * self.act(x2) if self.gate_last else self.act(x1) * x2)


def _rows_of(linear: nn.Linear, start: int, stop: int) -> nn.Linear:
    """A Linear whose weight is rows start:stop of ``linear``'s (a differentiable view), for the reference."""
    stand_in = nn.Linear(linear.in_features, stop - start).to(linear.weight.dtype)
    del stand_in.weight
    stand_in.weight = linear.weight[start:stop]
    return stand_in


@pytest.mark.parametrize("gate_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_gated_mlp_site_uses_its_slice_of_fc1(gate_last, training):
    """IIEU-B at a gated activation: the producer is the half of fc1 that feeds it (its rows of the weight
    are the filters), the patch is the block's input. Values and gradients against the reference."""
    import references as ref

    torch.manual_seed(0)
    model = GatedMlp(gate_last).double()
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    actlab.convert(model, "iieu_b", example_input=x[:2], strict=True)
    unit, hidden = model.act, 5
    start = hidden if gate_last else 0
    assert unit.producer is model.fc1 and f"producer=Linear[{start}:{start + hidden}]" in unit.extra_repr()
    assert unit.eta.dtype == torch.float64  # made in the dtype the site runs in
    assert actlab.conversion_report(model).converted[0].producer == f"fc1[{start}:{start + hidden}]"
    with torch.no_grad():
        unit.eta.copy_(torch.linspace(-0.5, 1.0, hidden, dtype=torch.float64))
    model.train(training)
    x.requires_grad_()
    out = model(x)
    fc1_out = model.fc1(x)
    x_t, other = fc1_out[..., start:start + hidden], fc1_out[..., hidden - start:2 * hidden - start]
    want = model.fc2(ref.iieu_b(unit, x_t, x, _rows_of(model.fc1, start, start + hidden)) * other)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    params = [x, model.fc1.weight, unit.eta, unit.norm.weight]
    weights = torch.randn_like(out)
    for got, expected in zip(torch.autograd.grad((out * weights).sum(), params),
                             torch.autograd.grad((want * weights).sum(), params)):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


class LinearNorm(nn.Module):
    """timm levit's LinearNorm: a Linear, then BatchNorm1d over the flattened tokens."""

    def __init__(self, a: int, b: int):
        super().__init__()
        self.linear, self.bn = nn.Linear(a, b, bias=False), nn.BatchNorm1d(b)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LevitMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.act, self.ln2 = LinearNorm(6, 8), nn.Hardswish(), LinearNorm(8, 6)

    def forward(self, x):
        return self.ln2(self.act(self.ln1(x)))


def test_a_module_ending_in_linear_and_norm_is_a_producer():
    """The producer is found from what ran: LinearNorm's output is its BatchNorm's output reshaped, whose
    input is the Linear's output flattened; IIEU-B binds to that Linear with the BatchNorm as the norm."""
    import references as ref

    torch.manual_seed(0)
    model = LevitMlp().double()
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    actlab.convert(model, "iieu_b", example_input=x[:2], strict=True)
    record = actlab.conversion_report(model).converted[0]
    assert (record.producer, record.norm) == ("ln1.linear", "ln1.bn")
    assert model.act.producer is model.ln1.linear
    model.train()
    x.requires_grad_()
    out = model.act(model.ln1(x))
    want = ref.iieu_b(model.act, model.ln1(x), x, model.ln1.linear)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    params = [x, model.ln1.linear.weight, model.ln1.bn.weight, model.act.eta]
    for got, expected in zip(torch.autograd.grad(out.square().sum(), params),
                             torch.autograd.grad(want.square().sum(), params)):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


class FunctionalBlock(nn.Module):
    """googlenet's BasicConv2d and friends: activations called as functions in the forward."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)), inplace=True)
        t = F.leaky_relu(self.fc1(x.mean((2, 3))), 0.2)
        return torch.relu(self.fc2(t)) + F.gelu(t, approximate="tanh") + t.relu()


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return F.relu(self.fc(x)) if x.sum() > 0 else F.silu(self.fc(x))  # fx cannot trace this


class FunctionalModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.tail = FunctionalBlock(), DataDependent()

    def forward(self, x):
        return F.relu(self.tail(self.block(x)))


def test_functional_activations_become_sites():
    torch.manual_seed(0)
    model = FunctionalModel().eval()
    x = torch.randn(2, 3, 5, 5)
    before = model(x)
    state_keys = set(model.state_dict())
    untouched = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="only 0 of 2 activation calls converted"):
        actlab.convert(untouched, "gelu", example_input=x, include="no-such-site")
    torch.testing.assert_close(untouched(x), before, rtol=0, atol=0)
    # nothing converted: the rewritten module is put back as it was
    assert type(untouched.block) is FunctionalBlock and set(dict(untouched.block.named_children())) == {
        "conv", "bn", "fc1", "fc2"}
    actlab.convert(model, "gelu", example_input=x)
    report = actlab.conversion_report(model)
    # the module tree kept, GELU has no state: only the conversion's record is new
    assert set(model.state_dict()) == state_keys | {RECORD_KEY}
    assert type(model.block).__name__ == "FunctionalBlock" and model.block.conv is not None
    names = {s.name: s for s in report.sites}
    assert set(names) == {"block.relu", "block.leaky_relu", "block.relu_1", "block.gelu", "block.relu_2"}
    assert names["block.leaky_relu"].original == "functional leaky_relu" and names["block.leaky_relu"].converted
    assert names["block.relu"].producer == "block.conv" and names["block.relu"].norm == "block.bn"
    assert len(report.functional) == 2
    assert any(n.startswith("tail: functional relu") and "torch.fx cannot trace it" in n for n in report.functional)
    assert any(n.startswith("the model's forward: functional relu") and "in place" in n for n in report.functional)
    # the output is the model's with each converted call now a GELU
    block = model.block
    h = F.gelu(block.bn(block.conv(x)))
    t = F.gelu(block.fc1(h.mean((2, 3))))
    want = F.gelu(block.fc2(t)) + F.gelu(t) + F.gelu(t)
    torch.testing.assert_close(model.block(x), want)
    assert not torch.allclose(model(x), before)


def test_functional_sites_train_with_iieu_b_and_can_be_left_alone():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    with pytest.warns(UserWarning, match="only 3 of 7 activation calls converted"):  # 2 follow leaky_relu
        model = actlab.convert(FunctionalModel(), "iieu_b", example_input=x)
    units = [m for m in model.modules() if isinstance(m, IIEUB)]
    assert {u.producer for u in units} == {model.block.conv, model.block.fc1, model.block.fc2}
    model.train()
    model(x).sum().backward()
    assert all(u.eta.grad is not None for u in units)
    with pytest.warns(UserWarning, match="only 0 of 5 activation calls converted"):
        kept = actlab.convert(FunctionalModel(), "iieu_b", example_input=x, functional=False)
    assert not actlab.conversion_report(kept).sites and len(actlab.conversion_report(kept).functional) == 5
    assert type(kept.block) is FunctionalBlock


class TokenNet(nn.Module):
    """Tokens with a learned first token, classified from that token or from the token mean."""

    def __init__(self, read_first: bool):
        super().__init__()
        self.read_first = read_first
        self.embed = nn.Linear(3, 8)
        self.first = nn.Parameter(torch.zeros(1, 1, 8))
        self.fc, self.act, self.head = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)

    def forward(self, x):  # (B, 3, H, W)
        t = self.embed(x.flatten(2).transpose(1, 2))
        t = torch.cat([self.first.expand(t.shape[0], -1, -1), t], 1)
        h = self.act(self.fc(t))
        return self.head(h[:, 0] if self.read_first else h.mean(1))


@pytest.mark.parametrize("read_first", [True, False])
def test_class_token_pooling_is_decided_from_what_the_model_reads(read_first):
    """No attribute names involved: a model that reads token 0 for its head gets class-token pooling, the
    same model pooling the token mean gets mean pooling, and the report says which."""
    model = actlab.convert(TokenNet(read_first), "dpa", num_classes=4, example_input=torch.randn(2, 3, 4, 4))
    assert model.act.token_pool == ("cls" if read_first else "mean")
    assert ("pools the class token" in str(actlab.conversion_report(model))) == read_first
