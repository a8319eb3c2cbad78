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
    if act == "meta_acon" and name in ("vit_micro", "pvt_tiny"):
        pytest.skip("meta_acon is a conv-channel activation")
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
    """SPEC 1: IIEU after bn1, bn2, bn3 (before the add) and on the BN'd shortcut, nothing after the add."""
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
