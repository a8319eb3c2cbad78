"""GPU checks (``pytest -m gpu``; skipped without CUDA): the kernel layer on CUDA against float64
references, gradcheck on CUDA, DPA memories on CUDA equal to the CPU's, real models training under bf16
and torch.compile, and checkpoints moving between GPU and CPU."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import actlab
from actlab.activations import DPA
from actlab.activations.kernels import composite

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["planes", "rows"])
def test_iieu_ops_on_cuda_against_float64(layout, dtype, tol):
    g = torch.Generator().manual_seed(0)
    if layout == "planes":
        x, inv, nu = torch.randn(8, 64, 196, generator=g), torch.rand(8, 4, 196, generator=g) + 0.2, torch.rand(8, 64, generator=g)
    else:
        x, inv, nu = torch.randn(8 * 65, 192, generator=g), torch.rand(8 * 65, generator=g) + 0.2, torch.rand(8, 192, generator=g)
    c = x.shape[1]
    inv_w, eta = torch.rand(c, generator=g) + 0.5, torch.rand(c, generator=g) * 0.8
    go = torch.randn(x.shape, generator=g)
    ref_args = [t.double() for t in (x.to(dtype), inv, inv_w, nu, eta)]
    cuda_args = [x.to(CUDA, dtype), *(t.to(CUDA) for t in (inv, inv_w, nu, eta))]
    out = torch.ops.actlab.iieu_forward(*cuda_args)
    assert out.dtype == dtype and out.is_cuda
    assert rel_err(out.cpu(), composite.iieu_forward(*ref_args)) < tol
    got = torch.ops.actlab.iieu_backward(go.to(CUDA, dtype), *cuda_args)
    want = composite.iieu_backward(go.to(dtype).double(), *ref_args)
    for a, b in zip(got, want):
        assert rel_err(a.cpu(), b) < tol


@pytest.mark.parametrize("tokens", [False, True], ids=["maps", "tokens"])
def test_tau_pool_on_cuda_against_float64(tokens):
    g = torch.Generator().manual_seed(1)
    x = torch.randn((16, 50, 64) if tokens else (16, 64, 49), generator=g)
    x[0, :3] = 0.0  # ties at tau = 0
    out, v, passes = torch.ops.actlab.tau_pool(x.to(CUDA), 0.0, tokens)
    want = composite.tau_pool(x.double(), 0.0, tokens)
    assert torch.equal(out.cpu(), want[0].float()) and torch.equal(passes.cpu(), want[2])
    assert rel_err(v.cpu(), want[1]) < 1e-6


def test_gradcheck_on_cuda():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 7, generator=g, dtype=torch.float64).to(CUDA).requires_grad_()
    inv = (torch.rand(2, 1, 7, generator=g, dtype=torch.float64) + 0.2).to(CUDA).requires_grad_()
    inv_w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).to(CUDA).requires_grad_()
    nu = torch.rand(2, 3, generator=g, dtype=torch.float64).to(CUDA).requires_grad_()
    eta = (torch.rand(3, generator=g, dtype=torch.float64) * 0.8).to(CUDA).requires_grad_()
    assert torch.autograd.gradcheck(torch.ops.actlab.iieu_forward, (x, inv, inv_w, nu, eta))
    t = (x.detach().sign() * (x.detach().abs() + 0.1)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: torch.ops.actlab.tau_pool(a, 0.0, False)[:2], (t,))


def test_dpa_memories_on_cuda_equal_the_cpu():
    torch.manual_seed(3)
    producer = torch.nn.Conv2d(3, 8, 3, padding=1)
    sites = {dev: (copy.deepcopy(producer).to(dev), DPA(8, 5, interval=2).to(dev)) for dev in ("cpu", "cuda")}
    g = torch.Generator().manual_seed(4)
    for _ in range(6):
        x, y = torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 5, (32,), generator=g)
        for dev, (conv, site) in sites.items():
            with actlab.targets(site, y.to(dev)):
                out = site(conv(x.to(dev)))
            (out.mean() + actlab.dpa_loss(site)).backward()
    cpu, cuda = sites["cpu"][1], sites["cuda"][1]
    torch.testing.assert_close(cuda.value_memory.cpu(), cpu.value_memory, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cuda.grad_memory.cpu(), cpu.grad_memory, rtol=1e-5, atol=1e-6)
    assert cpu.grad_memory.abs().sum() > 0


def _train(model, x, y, steps, compiled=False):
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with actlab.targets(model, y):
                loss = F.cross_entropy(forward(x).float(), y) + actlab.dpa_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("source,act", [("torchvision:resnet50", "iieu_b"), ("timm:vit_tiny_patch16_224", "dpa")])
def test_converted_models_train_under_bf16(source, act, compiled):
    torch.manual_seed(5)
    library, name = source.split(":")
    if library == "torchvision":
        import torchvision

        model = torchvision.models.get_model(name, num_classes=10)
    else:
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=10, img_size=64)
    size = 64
    # IIEU-B needs a producing module: torchvision's ReLUs after the residual adds stay ReLU (strict would refuse)
    actlab.convert(model, act, num_classes=10, example_input=torch.randn(2, 3, size, size), strict=act == "dpa")
    model = model.to(CUDA)
    x, y = torch.randn(16, 3, size, size, device=CUDA), torch.randint(0, 10, (16,), device=CUDA)
    losses = _train(model, x, y, steps=8, compiled=compiled)  # one batch, fitted: the loss must fall
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses


def test_compiled_training_equals_eager_on_cuda():
    """The kernel-layer operations (IIEU-DC: the IIEU-B units' and the coupler's) under Inductor on CUDA (maps in the layout Inductor picks, channels-last
    for convolution networks): a float32 ResNet-20 training step's loss and every parameter's gradient
    equal eager training's. (One step: over several SGD steps float rounding differences between any two
    implementations grow, ReLU's included.)"""
    from actlab.models import create_model

    torch.manual_seed(0)
    eager = create_model("resnet20", "iieu_dc", 10, image_size=32).to(CUDA)
    with torch.no_grad():
        for m in eager.modules():
            if hasattr(m, "eta"):
                m.eta.uniform_(0.2, 0.6)  # both branches of the adjuster
    compiled = copy.deepcopy(eager)
    g = torch.Generator(device=CUDA).manual_seed(1)
    x = torch.randn(8, 3, 32, 32, device=CUDA, generator=g)
    y = torch.randint(0, 10, (8,), device=CUDA, generator=g)
    losses = []
    for model, run in ((eager, eager), (compiled, torch.compile(compiled, fullgraph=True))):
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # the same float32 convolutions
            loss = F.cross_entropy(run(x), y)
            loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    got = torch.cat([p.grad.flatten() for p in compiled.parameters()])
    want = torch.cat([p.grad.flatten() for p in eager.parameters()])
    # on the CPU's Inductor: 7e-6 (IIEU-B), 1.2e-4 (IIEU-DC); the same model with ReLU: 9.5e-4 (its kinks)
    assert rel_err(got, want) < 1e-3
    for (name, a), b in zip(compiled.named_parameters(), eager.parameters()):
        assert rel_err(a.grad, b.grad) < 1e-2, name  # small sums such as eta's: up to 2e-3 on the CPU


@pytest.mark.parametrize("first,second", [("cuda", "cpu"), ("cpu", "cuda")])
def test_checkpoint_moves_between_gpu_and_cpu(first, second, tmp_path):
    from actlab.train import TrainConfig, load_run_model, train

    run = dict(model="resnet20", act="dpa", dataset="synthetic", image_size=8, batch_size=64, lr=0.05, log_every=5,
               amp="off", out=str(tmp_path / "run"))
    train(TrainConfig(**run, epochs=1, device=first), quiet=True)
    summary = train(TrainConfig(**run, epochs=2, device=second), resume=True, quiet=True, extend=True)
    assert math.isfinite(summary["loss"]) and summary["environment"]["cuda"] is not None
    model, saved = load_run_model(str(tmp_path / "run"))
    assert saved["epoch"] == 2 and all(not t.is_cuda for t in model.state_dict().values())


@pytest.mark.parametrize("act", ["iieu_b", "iieu_dc", "dpa"])
def test_trainer_runs_float16_with_loss_scaling_and_channels_last(act, tmp_path):
    """``actlab train --amp fp16 --channels-last`` on CUDA: float16 autocast with a GradScaler and NHWC maps;
    two epochs on generated images give finite, falling training losses and a finite test loss."""
    import json

    from actlab.train import TrainConfig, train

    out = tmp_path / "run"
    summary = train(TrainConfig(model="resnet20", act=act, dataset="synthetic", image_size=16, epochs=2,
                                batch_size=64, lr=0.05, amp="fp16", channels_last=True, device="cuda",
                                out=str(out)), quiet=True)
    losses = [json.loads(line)["train_loss"] for line in open(out / "log.jsonl")]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    assert math.isfinite(summary["loss"])


@pytest.mark.parametrize("act", ["iieu_b", "dpa"])
def test_training_steps_do_not_synchronise(act):
    """Eager training steps (DPA update steps included) run without a device-to-host synchronisation."""
    from actlab.models import create_model

    torch.manual_seed(6)
    model = create_model("resnet20", act, 10, image_size=16).to(CUDA)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(32, 3, 16, 16, device=CUDA), torch.randint(0, 10, (32,), device=CUDA)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with actlab.targets(model, y, validate=False):
                loss = F.cross_entropy(model(x).float(), y) + actlab.dpa_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # first call: kernel loading, cuDNN's choice, DPA's host copy of its step count
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):  # covers a DPA memory update (every 5th step)
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
