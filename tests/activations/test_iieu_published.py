"""IIEU-B with both published options (zero_patch="published", patch_channels="all") equals an independent
float64 port of the published MobileNetV2 x0.17 IIEU-B formulas, values and gradients; actlab's own
defaults differ from it at the depthwise convolutions."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import actlab
from actlab.models import create_model

EPS = 1e-8


class PublishedIIEUB(nn.Module):
    """The published unit's arithmetic, written out: the patch norm is taken over *all* input channels
    (RMS-pooled over the k x k window, zero padding counted, times k, plus eps, divided by k); 1x1 convs
    with stride take the strided positions; term-B from LayerNorm(GAP); the adjuster's two branches."""

    def __init__(self, unit: actlab.IIEUB, conv: nn.Conv2d):
        super().__init__()
        object.__setattr__(self, "conv", conv)  # a reference: the conv stays where the network has it
        self.eta = nn.Parameter(unit.eta.detach().clone())
        self.norm = copy.deepcopy(unit.norm)
        self.x_pre = None
        self.conv.register_forward_pre_hook(self._keep)

    def _keep(self, module, args):
        self.x_pre = args[0]

    def forward(self, x):
        conv, x_pre = self.conv, self.x_pre
        k, stride, padding = conv.kernel_size[0], conv.stride, conv.padding
        if k > 1:
            pooled = F.avg_pool2d(x_pre.pow(2).sum(1, keepdim=True), k, stride, padding, count_include_pad=True)
            inv_x = 1.0 / (pooled.sqrt() + EPS) / k
        else:
            inv_x = 1.0 / (torch.linalg.vector_norm(x_pre[:, :, ::stride[0], ::stride[1]], dim=1, keepdim=True) + EPS)
        c = conv.out_channels
        inv_w = (1.0 / (torch.linalg.vector_norm(conv.weight.reshape(c, -1), dim=1) + EPS)).view(1, c, 1, 1)
        shift = torch.sigmoid(self.norm(x.mean((2, 3))))[:, :, None, None]
        eta = self.eta.view(1, c, 1, 1)
        mask = shift - eta + inv_w * x * inv_x
        return torch.where(mask < 0, eta * x * torch.exp(mask.clamp(max=0)), eta * x + mask * x)


def _models(**act_kwargs):
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", "iieu_b", num_classes=10, image_size=32, width=0.17, dropout=0.0,
                         act_kwargs=act_kwargs).double()
    reference = copy.deepcopy(model)
    units = [(n, m) for n, m in reference.named_modules() if isinstance(m, actlab.IIEUB)]
    for name, unit in units:
        conv = unit.producer
        unit.release()
        parent, _, attr = name.rpartition(".")
        setattr(reference.get_submodule(parent), attr, PublishedIIEUB(unit, conv))
    return model, reference, len(units)


def _run(model, x, weights):
    x = x.clone().requires_grad_()
    out = model(x)
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad((out * weights).sum(), [x, *model.parameters()])
    return out, grads[0], dict(zip(names, grads[1:]))


def test_published_options_equal_the_published_mobilenet_v2_formulas():
    model, reference, units = _models(zero_patch="published", patch_channels="all")
    assert units == 35  # stem, every expansion and depthwise conv, the last 1x1
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    weights = torch.randn(2, 10, dtype=torch.float64)
    out, gx, grads = _run(model, x, weights)
    want, want_gx, want_grads = _run(reference, x, weights)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx, want_gx, rtol=1e-8, atol=1e-10)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-8, atol=1e-10, msg=name)
    # zero patches, where the published 1 / (||x|| + k eps) matters (values: the published square root has
    # no gradient at an all-zero patch)
    x[:, :, :8] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-10, atol=1e-12)


def test_the_group_rule_differs_from_the_published_one_at_depthwise_convolutions():
    model, reference, _ = _models(zero_patch="published")  # actlab's default patch_channels="group"
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    diff = (model(x) - reference(x)).abs().max()
    assert diff > 1e-3
