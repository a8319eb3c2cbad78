"""The model zoo: every architecture with its activations, the IIEU paper's placement, params/FLOPs."""
import pytest
import torch
import torch.nn as nn

import actlab
from actlab.activations.coupler import DynamicCoupler
from actlab.models import create_model, list_models, model_stats

CPU_FAST = ["resnet20", "vgg11", "alexnet", "resnet14", "mobilenet_v2", "shufflenet_v2", "vit_micro", "pvt_tiny"]


@pytest.mark.parametrize("name", CPU_FAST)
@pytest.mark.parametrize("act", ["relu", "iieu_b", "dpa", "meta_acon"])
def test_models_train_with_each_activation(name, act):
    kw = {"width": 0.17} if name == "mobilenet_v2" else {}
    model = create_model(name, act=act, num_classes=7, image_size=32, **kw)
    y = torch.tensor([1, 6])
    with actlab.targets(model, y):
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    (out.logsumexp(1).mean() + actlab.dpa_loss(model)).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad), name
    if act != "relu":
        report = actlab.conversion_report(model)
        assert report.converted and all(s.new == report.converted[0].new for s in report.converted)


def test_every_registered_model_builds():
    for name in list_models():
        model = create_model(name, act="relu", num_classes=3, image_size=32)
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3), name


def test_bottleneck_iieu_placement():
    """The IIEU paper's placement: IIEU after bn1, bn2, bn3 (before the add) and on the BN'd shortcut, nothing after the add."""
    model = create_model("resnet14", act="iieu_b", num_classes=10, image_size=32)
    block = model.stages[1][0]  # a down-sampling block
    assert isinstance(block.act3, actlab.IIEUB) and block.act3.producer is block.conv3
    assert isinstance(block.downsample[-1], actlab.IIEUB) and block.downsample[-1].producer is block.downsample[0]
    assert isinstance(block.act_out, nn.Identity)
    relu_block = create_model("resnet14", act="relu", num_classes=10, image_size=32).stages[1][0]
    assert isinstance(relu_block.act_out, nn.ReLU) and isinstance(relu_block.act3, nn.Identity)


def test_iieu_dc_puts_a_coupler_at_every_fusion():
    model = create_model("resnet20", act="iieu_dc", num_classes=10, image_size=32)
    fusions = [m.fuse for m in model.modules() if hasattr(m, "fuse")]
    assert len(fusions) == 9 and all(isinstance(f, DynamicCoupler) for f in fusions)
    assert any(isinstance(m, actlab.IIEUB) for m in model.modules())
    with pytest.raises(ValueError, match="iieu_dc replaces residual adds; vgg11 has none; models that take it"):
        create_model("vgg11", act="iieu_dc")


def test_resnet20_size_and_stats():
    model = create_model("resnet20", num_classes=10, image_size=32)
    stats = model_stats(model, 32)
    assert stats["params"] == sum(p.numel() for p in model.parameters())
    assert 0.26e6 < stats["params"] < 0.28e6  # He et al.: 0.27 M
    assert 2 * 40e6 < stats["flops"] < 2 * 42e6  # about 41 M multiply-adds, counted as 2 FLOPs each


def test_mobilenet_width_and_stem():
    small = create_model("mobilenet_v2", num_classes=10, image_size=32, width=0.17)
    full = create_model("mobilenet_v2", num_classes=10, image_size=32)
    assert sum(p.numel() for p in small.parameters()) < 0.3 * sum(p.numel() for p in full.parameters())
    assert small.features[0][0].stride == (1, 1)
    assert create_model("mobilenet_v2", num_classes=10, image_size=224).features[0][0].stride == (2, 2)


def test_unknown_model_and_activation():
    with pytest.raises(ValueError, match="unknown model 'resnet9'"):
        create_model("resnet9")
    with pytest.raises(KeyError, match="relux"):
        create_model("resnet20", act="relux")


def _make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def published_iieu_dc_mobilenet_v2_params(width: float = 0.17, num_classes: int = 1000) -> int:
    """Parameters of the IIEU paper's IIEU-DC MobileNetV2, counted from its published definition: an IIEU
    unit has a threshold and a LayerNorm (3 per channel); a Dynamic Coupler of C channels with hidden
    width h = C // 4 has two LayerNorms over 2C, two bias-free Linears C <-> h, and its inner IIEU a
    threshold and a per-row affine over (2, h); identity residuals (stride 1, equal widths) get one;
    the classifier has no dropout and 1280 inputs."""
    conv_bn = lambda cin, cout, k=1, groups=1: cin // groups * cout * k * k + 2 * cout  # noqa: E731
    iieu = lambda c: 3 * c  # noqa: E731
    coupler = lambda c: 8 * c + 2 * c * (c // 4) + 5 * (c // 4)  # noqa: E731
    cin = _make_divisible(32 * width)
    total = conv_bn(3, cin, 3) + iieu(cin)
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1)]:
        cout = _make_divisible(c * width)
        for i in range(n):
            hidden = round(cin * t)
            if t != 1:
                total += conv_bn(cin, hidden) + iieu(hidden)
            total += conv_bn(hidden, hidden, 3, groups=hidden) + iieu(hidden) + conv_bn(hidden, cout)
            if (s if i == 0 else 1) == 1 and cin == cout:
                total += coupler(cout)
            cin = cout
    return total + conv_bn(cin, 1280) + iieu(1280) + 1280 * num_classes + num_classes


def test_iieu_dc_mobilenet_v2_as_published():
    """Couplers on the identity residuals only (reduction 4, threshold init 0.05), IIEU-B at every site,
    no dropout: the parameter count at width 0.17 and 1000 classes equals the published model's."""
    model = create_model("mobilenet_v2", "iieu_dc", num_classes=1000, image_size=224, width=0.17, dropout=0.0)
    assert sum(p.numel() for p in model.parameters()) == published_iieu_dc_mobilenet_v2_params() == 1_462_520
    couplers = [m for m in model.modules() if isinstance(m, DynamicCoupler)]
    assert len(couplers) == 12 and all(float(c.act.eta[0].detach()) == pytest.approx(0.05) for c in couplers)
    assert not actlab.conversion_report(model).kept
    assert not any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
    model.train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(c.fc1.weight.grad is not None for c in couplers)


def test_vgg11_takes_the_digits_size_and_googlenet_trains_without_aux_heads():
    """vgg11 at 16x16 (digits' recommended size): its pools round up, so a 1x1 map stays 1x1 (32x32 keeps
    its shapes); torchvision's GoogLeNet and Inception-v3 train-mode forwards return plain logits."""
    import torch

    from actlab.models import create_model

    vgg = create_model("vgg11", "relu", 10, image_size=16)
    assert vgg(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert vgg.features(torch.randn(2, 3, 32, 32)).shape[-2:] == (1, 1)
    net = create_model("torchvision:googlenet", "relu", 10, image_size=64).train()
    out = net(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)


@pytest.mark.parametrize("build", ["resnet20", "vgg11", "alexnet", "resnet14"])
def test_built_in_architectures_take_their_activation_by_callable(build):
    """``act_layer`` (torchvision's injection by callable) gives every activation site a module of its own
    from the callable: no ReLU is left, no two sites share a module."""
    from actlab.models import bottleneck, cifar

    builder = getattr(cifar, build, None) or getattr(bottleneck, build)
    model = builder(num_classes=5, act_layer=nn.GELU)
    gelus = [m for m in model.modules() if isinstance(m, nn.GELU)]
    assert gelus and not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert len({id(m) for m in gelus}) == len(gelus)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
