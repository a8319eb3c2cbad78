"""Converted IIEU-B and DPA models in eval mode under torch.compile and exported to ONNX."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import actlab

ONNX_ATOL = 1e-4  # float32 kernels differ between PyTorch and onnxruntime in the last bits
ONNX_RTOL = 1e-4


class SmallResNet(nn.Module):
    """Stem, one residual block reusing its ReLU (so conversion splits it), a linear site, a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.dw(out)) + x)
        return self.head(self.act(self.fc1(out.mean((2, 3)))))


def converted(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = SmallResNet()
    actlab.convert(model, name, num_classes=5, example_input=torch.randn(2, 3, 16, 16))
    if name == "dpa":  # give the memories content so eval really is "TAU only"
        model.train()
        for _ in range(5):
            y = torch.randint(0, 5, (4,))
            with actlab.targets(model, y):
                model(torch.randn(4, 3, 16, 16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("name", ["iieu_b", "dpa"])
@pytest.mark.slow
def test_torch_compile_matches_eager(name):
    model = converted(name)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["iieu_b", "dpa"])
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_matches_onnxruntime(name, dynamo, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = converted(name)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = model(x).numpy()
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=["x"], output_names=["logits"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=ONNX_RTOL, atol=ONNX_ATOL)
    assert np.abs(expected).max() > 1e-3  # a meaningful comparison, not zeros against zeros


@pytest.mark.parametrize("name", ["iieu_b", "dpa"])
@pytest.mark.slow
def test_torch_compile_training_matches_eager(name):
    """torch.compile(model) trains like the eager model: same gradients, same DPA memories."""
    import copy

    import torch.nn.functional as F

    torch.manual_seed(0)
    eager = SmallResNet()
    actlab.convert(eager, name, num_classes=5, example_input=torch.randn(2, 3, 16, 16))
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    for _ in range(5):  # the 5th training forward is a DPA memory update
        for model, forward in ((eager, eager), (twin, compiled)):
            with actlab.targets(model, y):
                loss = F.cross_entropy(forward(x), y) + actlab.dpa_loss(model)
            loss.backward()
    for p, q in zip(eager.parameters(), twin.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5)
    for a, b in zip(eager.buffers(), twin.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", ["iieu_b", "dpa"])
def test_conversion_adds_no_graph_breaks(act):
    """What convert builds traces as one graph in eval mode: a split shared ReLU, a functional call
    rewritten by torch.fx, a channels-last MLP and a gated MLP."""
    from test_convert import ChannelsLastNet, FunctionalBlock, GatedMlp

    torch.manual_seed(0)
    model = nn.ModuleDict({"functional": FunctionalBlock(), "nhwc": ChannelsLastNet(), "gated": GatedMlp(True)})
    inputs = {"functional": torch.randn(2, 3, 5, 5), "nhwc": torch.randn(2, 3, 6, 5), "gated": torch.randn(2, 4, 6)}
    for key, sub in model.items():
        actlab.convert(sub, act, num_classes=5, example_input=inputs[key])
        sub.eval()
        with torch.no_grad():
            explained = torch._dynamo.explain(sub)(inputs[key])
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), (key, explained.break_reasons)
