"""Training under torch.compile(fullgraph=True): IIEU-B and DPA trace without a graph break and give the
eager results within float tolerance (forward, backward, DPA memories), on CPU."""
from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import actlab


def conv_block() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


class MlpBlock(nn.Module):
    """A ViT MLP block on tokens: LN -> fc1 -> act -> fc2, residual; mean-pooled head."""

    def __init__(self, dim: int = 12, hidden: int = 24, classes: int = 4):
        super().__init__()
        self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = x + self.fc2(self.act(self.fc1(self.norm(x))))
        return self.head(x.mean(1))


CASES = {
    "conv_bn_iieu": (conv_block, "iieu_b", (6, 3, 8, 8)),
    "vit_mlp_iieu": (MlpBlock, "iieu_b", (6, 5, 12)),
    "vit_mlp_dpa": (MlpBlock, "dpa", (6, 5, 12)),
    "conv_bn_dpa": (conv_block, "dpa", (6, 3, 8, 8)),
}


def build(case: str, seed: int = 0):
    make, act, shape = CASES[case]
    torch.manual_seed(seed)
    model = make()
    actlab.convert(model, act, num_classes=4, example_input=torch.randn(2, *shape[1:]), strict=True)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "eta"):
                m.eta.uniform_(0.2, 0.6)  # both branches of the adjuster
            if hasattr(m, "value_memory"):  # DPA memories that flag channels from the first step
                m.value_memory.copy_(torch.randn_like(m.value_memory))
                m.grad_memory.copy_(torch.randn_like(m.grad_memory).sign())
                m.interval = 2
    return model, shape


def train_steps(model, forward, shape, steps: int = 3):
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        x = torch.randn(shape, generator=g)
        y = torch.randint(0, 4, (shape[0],), generator=g)
        with actlab.targets(model, y):
            logits = forward(x)
        loss = F.cross_entropy(logits, y) + actlab.dpa_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("case", list(CASES))
def test_fullgraph_training_equals_eager(case):
    torch._dynamo.reset()
    eager, shape = build(case)
    compiled = copy.deepcopy(eager)
    compiled_forward = torch.compile(compiled, fullgraph=True)  # a graph break raises here
    want = train_steps(eager, eager, shape)
    got = train_steps(compiled, compiled_forward, shape)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(compiled.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    if CASES[case][1] == "dpa":
        site = next(m for m in compiled.modules() if isinstance(m, actlab.DPA))
        assert site.grad_memory.abs().sum() > 0 and int(site.count) == 3 % 2


def test_compiled_eval_matches_eager():
    torch._dynamo.reset()
    model, shape = build("conv_bn_iieu")
    model.eval()
    x = torch.randn(shape)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case,op", [("conv_bn_iieu", "actlab.iieu_unit"), ("vit_mlp_iieu", "actlab.iieu_unit"),
                                     ("conv_bn_dpa", "actlab.tau_pool"), ("vit_mlp_dpa", "actlab.dpa_step_")])
def test_one_graph_built_on_the_kernel_layer(case, op):
    """One graph per training forward (fullgraph), with the kernel layer's operations in it."""
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    model, shape = build(case)
    train_steps(model, torch.compile(model, backend=record, fullgraph=True), shape, steps=2)
    assert graphs and all(op in code for code in graphs), graphs[0]


def test_twelve_compiled_steps_with_new_labels_compile_once_and_hold_no_label():
    """A loader's new label tensor every step, memory updates on every second step: one graph, which reads
    the labels from the same persistent buffer at every call (what CUDA graphs need: a fixed address) and
    keeps no step's label tensor alive."""
    torch._dynamo.reset()
    graphs, label_inputs = [], []

    def record(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            label_inputs.append({a.data_ptr() for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.long
                                 and a.dim() == 1})
            return gm.forward(*args)

        return run

    model, shape = build("conv_bn_dpa")  # interval 2: six update steps among the twelve
    compiled = torch.compile(model, backend=record, fullgraph=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(2)
    held, addresses = [], set()
    for _ in range(12):
        x, y = torch.randn(shape, generator=g), torch.randint(0, 4, (shape[0],), generator=g)
        held.append(weakref.ref(y))
        addresses.add(y.data_ptr())
        with actlab.targets(model, y):
            loss = F.cross_entropy(compiled(x), y) + actlab.dpa_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        del x, y, loss
    assert len(graphs) == 1 and len(label_inputs) == 12
    assert all(inputs == label_inputs[0] and len(inputs) == 1 for inputs in label_inputs)
    assert not label_inputs[0] & addresses  # the buffer, not any step's tensor
    gc.collect()
    assert all(ref() is None for ref in held)
    site = next(m for m in model.modules() if isinstance(m, actlab.DPA))
    assert int(site.count) == 0 and site.grad_memory.abs().sum() > 0
