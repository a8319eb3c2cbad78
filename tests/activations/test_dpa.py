"""DPA: the vectorised memories against the sample-by-sample rule of docs/methods.md, persistence, errors, DDP."""
from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import actlab
from actlab.activations import DPA, sequential_ema_
from actlab.activations.dpa import _ThresholdUnit
import dpa_worker
import references as ref


@pytest.mark.parametrize("num_classes,batch", [(3, 40), (1, 17), (50, 64), (1, 300)])
def test_closed_form_ema_matches_the_sample_by_sample_rule(num_classes, batch):
    g = torch.Generator().manual_seed(num_classes)
    memory = torch.randn(num_classes, 5, generator=g)
    labels = torch.randint(0, num_classes, (batch,), generator=g)
    values = torch.randn(batch, 5, generator=g)
    expected, rows = memory.clone(), []
    for i in range(batch):
        c = int(labels[i])
        expected[c] = expected[c] + 0.9 * (values[i] - expected[c])
        rows.append(expected[c].clone())
    after = sequential_ema_(memory, labels, values, 0.9)
    # float32 rounding of the sequential rule: relative 1e-6 of the values' scale
    torch.testing.assert_close(memory, expected, rtol=1e-6, atol=1e-6 * values.abs().max().item())
    torch.testing.assert_close(after, torch.stack(rows), rtol=1e-6, atol=1e-6 * values.abs().max().item())


def test_closed_form_ema_leaves_out_non_finite_samples():
    """A sample with a non-finite value updates nothing; its row is its class's memory as it stands then."""
    g = torch.Generator().manual_seed(3)
    memory = torch.randn(3, 4, generator=g)
    labels = torch.tensor([1, 1, 2, 1, 1, 2])
    values = torch.randn(6, 4, generator=g)
    values[1, 2], values[2, 0], values[4, 3] = float("nan"), float("inf"), float("-inf")
    expected, rows = memory.clone(), []
    for i in range(6):
        c = int(labels[i])
        if bool(torch.isfinite(values[i]).all()):
            expected[c] = expected[c] + 0.9 * (values[i] - expected[c])
        rows.append(expected[c].clone())
    after = sequential_ema_(memory, labels, values, 0.9)
    torch.testing.assert_close(memory, expected)
    torch.testing.assert_close(after, torch.stack(rows))
    assert torch.equal(after[4], after[3])  # sample 4 was left out: the row of sample 3, its last update


def test_closed_form_ema_disabled_changes_nothing_and_empty_batch():
    from actlab.activations.kernels import composite

    memory = torch.randn(4, 3)
    before = memory.clone()
    labels, values = torch.tensor([2, 0, 2]), torch.randn(3, 3)
    rows = torch.ops.actlab.ema_update_(memory, labels, values, 0.9, torch.tensor(False))
    assert torch.equal(memory, before) and torch.equal(rows, before[labels])
    after, updated = composite.closed_form_ema(memory, labels[:0], values[:0], 0.9)
    assert after.shape == (0, 3) and torch.equal(updated, before)


@pytest.mark.parametrize("signs", [False, True])
def test_every_backend_updates_as_the_reference_when_enabled_and_not_at_all_when_not(signs):
    """The memory rule with a device-side flag (what a traced step calls on every step): enabled, each CPU
    backend gives the reference's memory and rows; disabled, the memory is untouched and the rows are the
    memory's rows of the labels (the C++ backend skips the work)."""
    from actlab.activations.kernels import composite, native

    g = torch.Generator().manual_seed(3)
    labels, values = torch.tensor([2, 0, 2, 1, 2]), torch.randn(5, 3, generator=g)
    start = torch.randn(4, 3, generator=g)
    want_memory = start.clone()
    want_rows = composite.ema_update_(want_memory, labels, values, 0.9, signs=signs)
    for backend in (composite, native):
        memory = start.clone()
        rows = backend.ema_update_(memory, labels, values, 0.9, signs=signs, enabled=torch.tensor(True))
        torch.testing.assert_close(memory, want_memory)
        torch.testing.assert_close(rows, want_rows)
        memory = start.clone()
        rows = backend.ema_update_(memory, labels, values, 0.9, signs=signs, enabled=torch.tensor(False))
        assert torch.equal(memory, start) and torch.equal(rows, start[labels])
        assert backend.ema_update_(memory, labels, values, 0.9, signs=signs, after=False,
                                   enabled=torch.tensor(False)) is None


class Net(nn.Module):
    """producer -> DPA -> head, for one input layout."""

    def __init__(self, layout: str, k: int = 1):
        super().__init__()
        self.layout, self.k = layout, k
        self.producer = nn.Conv2d(3, 6, 3, padding=1) if layout == "nchw" else nn.Linear(5, 6)
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 4)

    def features(self, x):
        return self.producer(x)

    def classify(self, out, batch):
        if self.layout == "nchw":
            pooled = out.mean((2, 3))
        elif self.layout == "nlc":
            pooled = out.mean(1)
        else:
            pooled = out
        return self.head(pooled.view(batch, self.k, -1).mean(1))

    def forward(self, x):
        batch = x.shape[0] // self.k
        return self.classify(self.act(self.features(x)), batch)


INPUTS = {"nchw": (3, 5, 5), "nc": (5,), "nlc": (4, 5)}


@pytest.mark.parametrize("layout,k", [("nchw", 1), ("nc", 1), ("nlc", 1), ("nlc", 3)],
                         ids=["conv", "flat", "tokens", "tokens_kB"])
def test_dpa_matches_sequential_rule_over_many_steps(layout, k):
    torch.manual_seed(0)
    net = Net(layout, k)
    # k rows per sample come from the data here, not from the model (as in TNT): declared explicitly
    actlab.convert(net, "dpa", num_classes=4, example_input=torch.randn(2 * k, *INPUTS[layout]), strict=True,
                   rows_per_sample=k)
    twin = copy.deepcopy(net)  # its layers drive the reference; its DPA module is never called
    seq = ref.SequentialDPA(4, 6)
    batch, lam = 12, 2.0
    g = torch.Generator().manual_seed(1)
    masked_steps = 0
    for step in range(25):
        x = torch.randn(batch * k, *INPUTS[layout], generator=g) - 0.2
        y = torch.randint(0, 4, (batch,), generator=g)
        y[:4] = 2  # repeated classes in every batch
        with actlab.targets(net, y):
            logits = net(x)
        loss = F.cross_entropy(logits, y) + lam * actlab.dpa_loss(net)
        loss.backward()

        x_t = twin.features(x)
        v = seq.pool(x_t, batch)
        mask, update = seq.forward(v, y)
        out = torch.where(x_t >= 0, x_t, torch.zeros_like(x_t))
        out.retain_grad()
        channel = (v.square() * mask).sum() / max(int(mask.sum()), 1)
        ref_loss = F.cross_entropy(twin.classify(out, batch), y) + lam * channel
        ref_loss.backward()
        if update:
            seq.backward(seq.pool(out.grad, batch), y)
        masked_steps += int(mask.any())

        # the closed form equals the sample-by-sample rule within float32 rounding
        torch.testing.assert_close(net.act.value_memory, seq.value, rtol=1e-6, atol=1e-7,
                                   msg=f"value memory differs at step {step}")
        torch.testing.assert_close(net.act.grad_memory, seq.grad, rtol=1e-6, atol=1e-7,
                                   msg=f"grad memory differs at step {step}")
        assert int(net.act.count) == seq.count
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(net.producer.weight.grad, twin.producer.weight.grad)
    assert masked_steps >= 5, "the test data should exercise the channel loss"


def test_memories_survive_state_dict_round_trip():
    model = dpa_worker.tiny_model()
    data = list(dpa_worker.batches(15, 10))
    dpa_worker.train_steps(model, data[:7])
    restored = dpa_worker.tiny_model(seed=5)
    restored.load_state_dict(copy.deepcopy(model.state_dict()))
    site = restored[1]
    assert set(k for k in restored.state_dict() if k.startswith("1.")) == {"1.value_memory", "1.grad_memory", "1.count"}
    assert torch.equal(site.value_memory, model[1].value_memory) and int(site.count) == 7 % 5
    dpa_worker.train_steps(model, data[7:])
    dpa_worker.train_steps(restored, data[7:])
    assert torch.equal(model[1].value_memory, restored[1].value_memory)
    assert torch.equal(model[1].grad_memory, restored[1].grad_memory)
    assert model[1].value_memory.abs().sum() > 0 and model[1].grad_memory.abs().sum() > 0


def test_eval_is_tau_and_changes_nothing():
    model = dpa_worker.tiny_model()
    dpa_worker.train_steps(model, dpa_worker.batches(6, 8))
    before = copy.deepcopy(model.state_dict())
    model.eval()
    x = torch.randn(5, 6)
    out = model[1](model[0](x))
    pre = model[0](x)
    assert torch.equal(out, torch.where(pre >= 0, pre, torch.zeros_like(pre)))
    model(x)
    assert actlab.dpa_loss(model).item() == 0.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_channel_loss_pushes_masked_responses_down():
    model = dpa_worker.tiny_model()
    site = model[1]
    with torch.no_grad():
        site.value_memory.fill_(-1.0)
        site.grad_memory.fill_(-1.0)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with actlab.targets(model, y):
        model(x)
    loss = actlab.dpa_loss(model)
    pre = model[0](x)
    positive = pre > 0  # mask = memory < 0 (all) & v > 0 & grad memory < 0 (all)
    torch.testing.assert_close(loss, (pre.square() * positive).sum() / positive.sum())
    loss.backward()
    assert model[0].weight.grad.abs().sum() > 0


def test_gradcheck_threshold_unit():
    x = torch.randn(4, 6, dtype=torch.float64)
    x = torch.where(x.abs() < 0.05, x + 0.2, x).requires_grad_()  # keep away from the kink
    assert torch.autograd.gradcheck(lambda t: _ThresholdUnit.apply(t, 0.0), (x,))
    assert torch.autograd.gradcheck(lambda t: _ThresholdUnit.apply(t, 0.5), (x + 0.01,))
    assert torch.autograd.gradcheck(lambda t: _ThresholdUnit.apply(t, -0.5), (x + 0.01,))


@pytest.mark.parametrize("n", [1, 8, 13, 64])
def test_bit_packing_round_trip(n):
    from actlab.activations.kernels.composite import pack_bits, unpack_bits

    mask = torch.rand(n, 3) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


def test_gradient_passes_at_threshold():
    x = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    _ThresholdUnit.apply(x, 0.0).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0]
    x = torch.tensor([-1.0, 0.5, 0.25, 2.0], requires_grad=True)
    out = _ThresholdUnit.apply(x, 0.5)
    out.sum().backward()
    assert out.tolist() == [0.0, 0.5, 0.0, 2.0] and x.grad.tolist() == [0.0, 1.0, 0.0, 1.0]
    x = torch.tensor([-1.0, -0.5, -0.75, 2.0], requires_grad=True)  # tau < 0: negative values pass too
    out = _ThresholdUnit.apply(x, -0.5)
    out.sum().backward()
    assert out.tolist() == [0.0, -0.5, 0.0, 2.0] and x.grad.tolist() == [0.0, 1.0, 0.0, 1.0]


def test_clear_errors():
    model = dpa_worker.tiny_model()
    model[1].site = "1"
    with pytest.raises(RuntimeError, match="DPA site '1'.*needs class targets"):
        model(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"DPA site '1'.*out of range \[0, 3\).*max 3"):
        with actlab.targets(model, torch.tensor([0, 1, 3, 2])):
            pass
    with pytest.raises(ValueError, match="integer class indices"):  # ((B, K) floats are soft targets)
        with actlab.targets(model, torch.rand(4)):
            pass
    site = DPA(4, num_classes=2)
    site.site = "blocks.0"
    with pytest.raises(ValueError, match="blocks.0.*cannot pool"):
        with actlab.targets(site, torch.tensor([0])):
            site(torch.randn(1, 4, 2, 2, 2))
    with pytest.raises(ValueError, match="blocks.0.*the targets hold 2 labels, but the input has 3 rows"):
        with actlab.targets(site, torch.tensor([0, 1])):
            site(torch.randn(3, 4))
    with pytest.raises(ValueError, match="num_classes"):
        actlab.convert(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), "dpa", example_input=torch.randn(2, 3))
    with pytest.raises(ValueError, match="num_classes"):
        actlab.create_activation("dpa", channels=4)


def test_dpa_loss_is_zero_without_sites_or_masks():
    model = nn.Sequential(nn.Linear(3, 3))
    assert actlab.dpa_loss(model).item() == 0.0
    fresh = dpa_worker.tiny_model()
    with actlab.targets(fresh, torch.tensor([0, 1])):
        fresh(torch.randn(2, 6))
    assert actlab.dpa_loss(fresh).item() == 0.0  # memories start at 0: nothing is masked yet


@pytest.mark.parametrize("capacity", [None, 8], ids=["sizes_exchanged", "cuda_path_capacity"])
@pytest.mark.slow
def test_two_gloo_processes_match_one_process_on_global_batch(tmp_path, capacity):
    """Two gloo ranks equal one process on the global batch. With a capacity (rows padded to 8 of which 5
    are samples) on the CUDA code path: the same, and no step reads a value back to the host."""
    if capacity is not None and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CUDA code path on CPU tensors needs Triton's interpreter")
    steps, batch = 12, 10
    mp.spawn(dpa_worker.gloo_worker, args=(2, str(tmp_path / "init"), str(tmp_path), steps, batch, capacity),
             nprocs=2)
    if capacity is not None:
        assert [torch.load(tmp_path / f"syncs{r}.pt") for r in (0, 1)] == [[], []]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    single = dpa_worker.tiny_model()
    dpa_worker.train_steps(single, dpa_worker.batches(steps, batch))
    for key in ("1.value_memory", "1.grad_memory", "1.count"):
        assert torch.equal(rank0[key], rank1[key]), key
    assert torch.equal(rank0["1.count"], single.state_dict()["1.count"])
    assert single[1].grad_memory.abs().sum() > 0
    # the channel loss is a mean over the global batch, so the weights follow the single process too
    for key, value in single.state_dict().items():
        assert torch.equal(rank0[key], rank1[key]), key
        # DDP sums the ranks' gradients in another order: equal up to float rounding
        torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture
def dpa_kernels():
    from actlab.activations import kernels

    yield kernels.set_kernels
    kernels.set_kernels(os.environ.get("ACTLAB_KERNELS", "auto"))


def _native_vs_eager_steps(set_kernels, x_steps, y_steps, tau=0.0):
    """Run the same DPA site through several training steps with each kernel mode; returns per mode the
    outputs, input gradients, channel losses and final memories."""
    results = {}
    for mode in ("eager", "native"):
        set_kernels(mode)
        torch.manual_seed(0)
        channels = x_steps[0].shape[1 if x_steps[0].dim() == 4 else -1]
        site = DPA(channels, 4, tau=tau, interval=2)
        with torch.no_grad():  # memories that flag channels from the first step on
            site.value_memory.copy_(torch.randn(4, site.channels))
            site.grad_memory.copy_(torch.randn(4, site.channels).sign())
        outs, grads, losses = [], [], []
        for x, y in zip(x_steps, y_steps):
            x = x.clone().requires_grad_(True)
            with actlab.targets(site, y):
                out = site(x)
            loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + 3 * actlab.dpa_loss(site)
            loss.backward()
            outs.append(out.detach()), grads.append(x.grad), losses.append(actlab.dpa_loss(site).detach())
        results[mode] = (outs, grads, losses, site.value_memory.clone(), site.grad_memory.clone())
    return results


@pytest.mark.parametrize("shape", [(6, 5, 5, 5), (6, 7, 13)], ids=["conv", "tokens"])
@pytest.mark.parametrize("tau", [0.0, 0.25])
def test_native_kernel_is_bitwise_the_eager_ops_on_exact_inputs(dpa_kernels, tau, shape):
    # multiples of 1/8 keep every sum exact, so pooling order cannot matter: results must be identical;
    # 5x5 maps and 13 channels leave tails after the vector loops and planes that start inside a byte of the
    # pass mask, and x == tau occurs (the gradient passes there)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randint(-8, 9, shape, generator=g).float() / 8 + tau for _ in range(4)]
    ys = [torch.randint(0, 4, (6,), generator=g) for _ in range(4)]
    xs[1] = xs[1].clamp_min(tau + 0.125)  # a step where everything passes
    r = _native_vs_eager_steps(dpa_kernels, xs, ys, tau)
    assert any(bool(loss > 0) for loss in r["eager"][2])  # the channel loss took part
    for a, b in zip(r["eager"][:3], r["native"][:3]):
        for t_eager, t_native in zip(a, b):
            assert torch.equal(t_eager, t_native)
    assert torch.equal(r["eager"][3], r["native"][3]) and torch.equal(r["eager"][4], r["native"][4])


@pytest.mark.parametrize("shape", [(8, 16, 7, 9), (8, 65, 40)], ids=["conv", "tokens"])
def test_native_kernel_close_to_eager_on_random_inputs(dpa_kernels, shape):
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(shape, generator=g) for _ in range(3)]
    ys = [torch.randint(0, 4, (8,), generator=g) for _ in range(3)]
    r = _native_vs_eager_steps(dpa_kernels, xs, ys)
    for a, b in zip(r["eager"][:3], r["native"][:3]):
        for t_eager, t_native in zip(a, b):
            torch.testing.assert_close(t_native, t_eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["eager", "native"])
def test_gradcheck_tau_pool(dpa_kernels, mode):
    from actlab.activations.kernels import native

    if mode == "native" and not native.available():
        pytest.skip(f"native kernels not built here: {native.build_error()}")
    dpa_kernels(mode)
    g = torch.Generator().manual_seed(5)
    # float64 runs the composite (the reference); the C++ kernel is float32 only, so there finite
    # differences need a coarse step and tolerance
    dtype, tol = (torch.float64, {}) if mode == "eager" else (torch.float32, dict(eps=1e-2, atol=2e-3, rtol=1e-2))
    for shape, tokens in (((2, 3, 15), False), ((2, 4, 11), True)):
        x = torch.randn(shape, generator=g, dtype=dtype)
        x = (x.sign() * (x.abs() + 0.1)).requires_grad_(True)  # away from the kink at 0

        def f(t):
            out, v, _ = torch.ops.actlab.tau_pool(t, 0.0, tokens)
            return out, v
        assert torch.autograd.gradcheck(f, (x,), fast_mode=False, **tol)


@pytest.mark.parametrize("shape,tokens,cls", [((2, 3, 5, 3), False, False), ((2, 4, 8), True, False),
                                              ((2, 4, 8), True, True)], ids=["maps", "tokens", "class_token"])
def test_gradcheck_eager_site_forward(shape, tokens, cls):
    """The eager training forward's autograd function (TAU, pooled v, mask) in float64, maps with their
    spatial dims, token means and the class token."""
    from actlab.activations.dpa import _EagerDPAForward

    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = (x.sign() * (x.abs() + 0.1)).requires_grad_(True)  # away from the kink at 0
    c = shape[2] if tokens else shape[1]
    memories = (torch.randn(3, c, dtype=torch.float64), torch.randn(3, c, dtype=torch.float64))
    labels = torch.tensor([2, 0])

    def f(t):
        out, v, mask = _EagerDPAForward.apply(t, 0.0, tokens, cls, memories, labels, None)
        return out, v

    assert torch.autograd.gradcheck(f, (x,), fast_mode=False)
    _, v, mask = _EagerDPAForward.apply(x, 0.0, tokens, cls, memories, labels, None)
    want = x[:, 0] if cls else x.mean(1) if tokens else x.mean((2, 3))
    torch.testing.assert_close(v, want)
    assert torch.equal(mask, (memories[0][labels] < 0) & (want > 0) & (memories[1][labels] < 0))


@pytest.mark.parametrize("mode", ["eager", "native"])
def test_channels_last_maps_fused_without_a_copy(dpa_kernels, mode):
    """A channels_last map is taken as (B, H*W, C) tokens: same output, gradients and memories as the
    contiguous map, output in channels_last."""
    dpa_kernels(mode)
    g = torch.Generator().manual_seed(6)
    x0, w = torch.randn(4, 6, 5, 3, generator=g), torch.randn(4, 6, 5, 3, generator=g)
    y = torch.tensor([0, 2, 2, 1])
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        site = DPA(6, 3, interval=1)
        x = x0.clone().contiguous(memory_format=fmt).requires_grad_()
        with actlab.targets(site, y):
            out = site(x)
        (out * w).sum().backward()
        results.append((out, x.grad, site.value_memory.clone(), site.grad_memory.clone()))
    assert results[1][0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_soft_targets_give_the_most_probable_class():
    """Mixup / CutMix / label-smoothed targets (B, K): the memories the rows' most probable classes give."""
    g = torch.Generator().manual_seed(8)
    x0 = torch.randn(4, 6, 5, 3, generator=g)
    y = torch.tensor([0, 2, 2, 1])
    soft = 0.1 / 2 + 0.8 * F.one_hot(y, 3).float()
    soft[1] = torch.tensor([0.3, 0.3, 0.4])  # a mixed row: class 2 weighs most
    memories = []
    for targets in (y, soft):
        site = DPA(6, 3, interval=1)
        x = x0.clone().requires_grad_()
        with actlab.targets(site, targets):
            site(x).sum().backward()
        memories.append((site.value_memory.clone(), site.grad_memory.clone()))
    assert memories[0][0].abs().sum() > 0
    for a, b in zip(*memories):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"soft targets \(B, K\)"):
        with actlab.targets(DPA(6, 3), torch.ones(4, 3, 2)):
            pass


@pytest.mark.parametrize("labels", [4, 1, 16])
def test_targets_of_another_length_than_the_batch_are_refused(labels):
    """8 samples with 4, 1 or 16 labels: an error naming the site and both sizes, and no memory touched
    (the k x B row grouping applies only where the site declares it)."""
    net = Net("nchw", 1)
    actlab.convert(net, "dpa", num_classes=4, example_input=torch.randn(2, *INPUTS["nchw"]), strict=True)
    site = next(m for m in net.modules() if isinstance(m, DPA))
    before = copy.deepcopy(site.state_dict())
    with pytest.raises(ValueError, match=rf"DPA site '{site.site}': the targets hold {labels} labels, but the "
                                         r"input has 8 rows"):
        with actlab.targets(net, torch.zeros(labels, dtype=torch.long)):
            net(torch.randn(8, *INPUTS["nchw"]))
    assert all(torch.equal(before[k], v) for k, v in site.state_dict().items())


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "eval"])
def test_memories_and_count_change_only_in_a_training_forward_with_a_graph(context):
    net = Net("nchw", 1)
    actlab.convert(net, "dpa", num_classes=4, example_input=torch.randn(2, *INPUTS["nchw"]), strict=True)
    site = next(m for m in net.modules() if isinstance(m, DPA))
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    for _ in range(6):  # training steps first: memories (updated at the 5th) and count away from their start
        with actlab.targets(net, y):
            net(torch.randn(6, *INPUTS["nchw"])).sum().backward()
    before = copy.deepcopy(site.state_dict())
    guard = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "eval": contextlib.nullcontext}[context]
    net.train(context != "eval")
    with guard():
        for _ in range(7):  # spans an update step of the schedule
            with actlab.targets(net, y):
                out = net(torch.randn(6, *INPUTS["nchw"]))
            net(torch.randn(6, *INPUTS["nchw"]))  # and without targets: no error either
    assert torch.isfinite(out).all()
    assert all(torch.equal(before[k], v) for k, v in site.state_dict().items())
    assert float(actlab.dpa_loss(net)) == 0.0
