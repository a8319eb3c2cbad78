"""The CUDA code path on CPU tensors (one switch) and the GPU cost model that counts what it launches."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import actlab
from actlab.activations import kernels
from actlab.perf import gpu_cost

pytest.importorskip("actlab.activations.kernels.triton_kernels", reason="triton not installed")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and Triton's interpreter is off", allow_module_level=True)


@pytest.fixture
def emulated():
    kernels.set_emulate_cuda(True)
    try:
        yield
    finally:
        kernels.set_emulate_cuda(False)


def test_counter_counts_kernels_bytes_views_and_syncs():
    a, b = torch.randn(1000), torch.randn(1000)
    with gpu_cost.CostCounter() as counter:
        c = a + b                      # one kernel: 2 reads, 1 write
        v = c.view(10, 100)            # a view: a host call, no kernel
        d = v + torch.ones(1)          # broadcast operand counted once
        s = d.sum().item()             # a device-to-host read
    names = [(x.name, x.kernels, x.bytes, x.sync) for x in counter.calls]
    assert names[0] == ("add", 1, 12_000, False)
    assert names[1] == ("view", 0, 0, False)
    assert ("add", 1, 4000 + 4 + 4000, False) in names
    assert sum(x.sync for x in counter.calls) == 1 and isinstance(s, float)


def test_a_triton_launch_is_one_call_and_the_interpreters_own_work_is_not_counted():
    from actlab.activations.kernels import triton_kernels

    x = torch.randn(2, 6, 5, 5)
    with gpu_cost.CostCounter() as counter:
        out = triton_kernels.channel_sumsq(x, 2, torch.float32)
    launches = [c for c in counter.calls if c.name.startswith("triton")]
    assert len(launches) == 1 and launches[0].kernels == 1
    assert launches[0].bytes == x.numel() * 4 + out.numel() * 4
    assert all(c.kernels == 0 for c in counter.calls if not c.name.startswith("triton"))  # just the allocation
    torch.testing.assert_close(out, x.square().view(2, 2, 3, 5, 5).sum(2))


@pytest.mark.parametrize("kernel", [3, 1], ids=["3x3", "1x1"])
def test_emulation_runs_the_cuda_path_on_cpu_tensors_with_the_same_results(kernel, emulated):
    from actlab.activations.kernels import triton_kernels

    torch.manual_seed(0)
    site = nn.Sequential(nn.Conv2d(3, 8, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    actlab.convert(site, "iieu_b", example_input=torch.randn(2, 3, 8, 8))
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    assert kernels.backend(x) is triton_kernels and kernels.runs_like_cuda(x)
    with gpu_cost.CostCounter() as counter:
        out = site(x)
        out.sum().backward()
    launched = {c.name for c in counter.calls if c.name.startswith("triton")}
    assert {"triton _iieu_bn_sums", "triton _iieu_bn_grad", "triton _plane_moments"} <= launched
    assert type(out.grad_fn).__name__ == "IIEUNormFunctionBackward"  # through the BatchNorm in two passes
    assert not any("BatchNormBackward" in c.where for c in counter.calls)  # and none of its own
    params = list(site.parameters())
    assert len(params) == 6  # conv weight, BatchNorm's weight and bias, eta, term-B LayerNorm's: all reached
    got = (out.detach(), x.grad.clone(), *(p.grad.clone() for p in params))
    kernels.set_emulate_cuda(False)
    kernels.set_kernels("eager")
    try:
        x.grad = None
        site.zero_grad()
        want = site(x)
        want.sum().backward()
    finally:
        kernels.set_kernels(os.environ.get("ACTLAB_KERNELS", "auto"))
    for a, b in zip(got, (want.detach(), x.grad, *(p.grad for p in params))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(b.abs().max().item(), 1.0))


def test_bf16_conv_bn_site_on_the_cuda_path_follows_the_float32_reference(emulated):
    """Under bf16 autocast on the CUDA path the conv-BN site runs the fused backward on bf16 maps (no
    float32 copy of them) and its gradients follow the float32 composite to bf16 precision."""
    torch.manual_seed(1)
    site = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
    actlab.convert(site, "iieu_b", example_input=torch.randn(2, 8, 8, 8))
    x = torch.randn(4, 8, 12, 12)
    params = [site[0].weight, site[1].weight, site[1].bias, site[2].eta]
    weight = torch.randn(4, 16, 12, 12)

    def grads(autocast: bool):
        xs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = site(xs)
        assert (out.dtype == torch.bfloat16) == autocast
        return out.float(), torch.autograd.grad((out.float() * weight).sum(), [xs, *params])

    with gpu_cost.CostCounter() as counter:
        got = grads(True)
    copies = [c.bytes for c in counter.calls if c.name == "_to_copy" and c.where.startswith("actlab/")]
    assert max(copies, default=0) < x.numel()  # per-channel values at most: no copy of a map
    assert {"triton _iieu_bn_sums", "triton _iieu_bn_grad"} <= {c.name for c in counter.calls}
    kernels.set_emulate_cuda(False)
    kernels.set_kernels("eager")
    try:
        want = grads(False)
    finally:
        kernels.set_kernels(os.environ.get("ACTLAB_KERNELS", "auto"))
    torch.testing.assert_close(got[0], want[0], rtol=3e-2, atol=3e-2 * want[0].abs().max().item())
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-2 * b.abs().max().item())



def mlp_block():
    """A ViT-style MLP (Linear, activation, Linear) with IIEU-B at its norm-less Linear site."""
    torch.manual_seed(2)
    block = nn.Sequential(nn.Linear(12, 40), nn.GELU(), nn.Linear(40, 12))
    actlab.convert(block, "iieu_b", example_input=torch.randn(2, 5, 12))
    with torch.no_grad():
        block[1].eta.uniform_(0.2, 0.6)
        block[1].norm.weight.uniform_(0.5, 1.5)
        block[1].norm.bias.uniform_(-0.5, 0.5)
    return block


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_linear_site_on_the_cuda_path_differentiates_through_the_linear(autocast, emulated):
    """At a norm-less Linear site the CUDA path takes GAP through the Linear (statistics from x_pre, term-B's
    gradient into the filters, the bias and x_pre) and equals the CPU path, which spreads term-B's
    gradient over x_t's: in float32 to rounding; under bf16 autocast about as far from the float32
    reference as the CPU path's bf16 run."""
    block = mlp_block()
    x = torch.randn(3, 7, 12)
    weight = torch.randn(3, 7, 12)
    params = list(block.parameters())
    assert len(params) == 7  # both Linears' weights and biases, eta, term-B's LayerNorm weight and bias

    def grads(cast: bool):
        xs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
            out = block(xs)
        return out.float(), torch.autograd.grad((out.float() * weight).sum(), [xs, *params])

    with gpu_cost.CostCounter() as counter:
        got = grads(autocast)
    launched = {c.name for c in counter.calls if c.name.startswith("triton")}
    assert {"triton _linear_site_stats", "triton _linear_site_sample", "triton _linear_site_channels"} <= launched
    assert "triton _spread_rows" not in launched  # no pass spreading term-B's gradient over x_t's
    kernels.set_emulate_cuda(False)
    kernels.set_kernels("eager")
    try:
        want, cpu = grads(False), grads(autocast)
    finally:
        kernels.set_kernels(os.environ.get("ACTLAB_KERNELS", "auto"))
    if not autocast:
        for a, b in zip((got[0], *got[1]), (want[0], *want[1])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(b.abs().max().item(), 1.0))
        return
    # bf16: about as far from the float32 reference as the CPU path's bf16 run (term-B's spread over x_t);
    # Triton's interpreter truncates where a GPU rounds to the nearest, hence the margin of about an ulp
    for a, c, b in zip((got[0], *got[1]), (cpu[0], *cpu[1]), (want[0], *want[1])):
        scale = b.abs().max().item()
        assert (a.float() - b).abs().max().item() <= 2 * (c.float() - b).abs().max().item() + 1e-2 * scale


def test_linear_site_function_gradcheck(emulated):
    """float64 gradcheck of the Linear-site function (the composite serves float64 on the CUDA path):
    x_pre, the Linear's weight and bias, eta and term-B's LayerNorm, x_t made by the Linear."""
    from actlab.activations.iieu.function import IIEULinearFunction

    from actlab.activations.iieu.function import LinearReplay, LinearSite

    block = mlp_block().double()
    unit, linear = block[1], block[0]
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    x.data[0, 1] = 0  # a silenced row
    params = [p.detach().clone().requires_grad_() for p in (linear.weight, linear.bias, unit.eta, unit.norm.weight,
                                                             unit.norm.bias)]
    site = LinearSite(unit.patches, 1e-8, 1e-6 * 12 ** 0.5, 1e-8, unit.norm.eps, None, LinearReplay(False, torch.float64))

    def f(x, weight, bias, eta, ln_weight, ln_bias):
        x_t = nn.functional.linear(x, weight, bias)
        return IIEULinearFunction.apply(x_t, x, weight, bias, eta, ln_weight, ln_bias, site)

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)


class TwoSites(nn.Module):
    """Two DPA sites: 7x7 maps (planes that share bytes of the pass mask) or (B, N, C) tokens, the second
    pooling the class token."""

    def __init__(self, tokens: bool):
        super().__init__()
        self.tokens = tokens
        make = (lambda i, o: nn.Linear(i, o)) if tokens else (lambda i, o: nn.Conv2d(i, o, 3, padding=1))
        self.a, self.b = make(3, 16), make(16, 24)
        self.act_a = actlab.DPA(16, 5, interval=5)
        self.act_b = actlab.DPA(24, 5, interval=5, token_pool="cls" if tokens else "mean")
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        h = self.act_b(self.b(self.act_a(self.a(x))))
        return self.head(h.mean(1) if self.tokens else h.mean((2, 3)))


@pytest.mark.parametrize("tokens", [False, True], ids=["maps", "tokens"])
@pytest.mark.slow
def test_dpa_training_on_the_cuda_path_follows_the_cpu_path(tokens, emulated):
    """Eleven training steps (two memory updates, the scan kernel's) on the CUDA path and on the CPU path
    from the same start: the same channel loss, gradients, memories and schedule."""
    torch.manual_seed(0)
    cuda_path = TwoSites(tokens)
    cpu_path = copy.deepcopy(cuda_path)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn((6, 9, 3) if tokens else (6, 3, 7, 7), generator=g),
                torch.randint(0, 5, (6,), generator=g)) for _ in range(11)]

    def train(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for x, y in batches:
            with actlab.targets(model, y):
                loss = F.cross_entropy(model(x), y) + actlab.dpa_loss(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return torch.stack(losses)

    with gpu_cost.CostCounter(execute=True) as counter:
        got = train(cuda_path)
    launched = {c.name for c in counter.calls if c.name.startswith("triton")}
    assert {"triton _dpa_tokens" if tokens else "triton _dpa_planes", "triton _ema_scan"} <= launched
    kernels.set_emulate_cuda(False)
    want = train(cpu_path)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for key, value in cpu_path.state_dict().items():
        torch.testing.assert_close(cuda_path.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert int(cuda_path.act_a.count) == 11 % 5 and bool(cuda_path.act_b.grad_memory.ne(0).any())


def test_labels_on_the_cuda_path_are_checked_on_the_device_without_a_host_read(emulated):
    model = TwoSites(False)
    with gpu_cost.CostCounter() as counter:
        with actlab.targets(model, torch.tensor([0, 4, 2])):
            pass
    names = [c.name for c in counter.calls]
    assert "_assert_async" in names and not any(c.sync for c in counter.calls)
    with pytest.raises(RuntimeError, match=r"a class index outside \[0, 5\) reached a DPA site"):
        with actlab.targets(model, torch.tensor([0, 5, 2])):
            pass
    with pytest.raises(ValueError, match="integer class indices"):  # what needs no read: checked at once
        with actlab.targets(model, torch.tensor([0.0, 1.0])):
            pass
    kernels.set_emulate_cuda(False)
    with pytest.raises(ValueError, match=r"out of range \[0, 5\) \(min 0, max 5\)"):  # CPU: on the host
        with actlab.targets(model, torch.tensor([0, 5, 2])):
            pass


@pytest.mark.slow
def test_a_counted_training_step_is_deterministic_and_never_syncs(emulated):
    """Two counts of the same step agree to the call, the second with the Triton launches skipped (the
    command's default), DPA's update and ordinary steps too; a training step on the CUDA path makes no
    host synchronisation, DPA's update step included; a DPA interval holds one update step; ReLU's step
    launches no actlab kernel; DPA meets its per-site targets."""
    def same(a, b):
        assert [(s.host_calls, s.kernels, s.bytes, s.by_line) for s in a["ordinary"] + a["update"]] == \
            [(s.host_calls, s.kernels, s.bytes, s.by_line) for s in b["ordinary"] + b["update"]]

    w = gpu_cost.Workload("resnet20", "iieu_b", 1, 8, 10)
    first = gpu_cost.count_steps(w)
    same(first, gpu_cost.count_steps(w, execute=False))
    w = gpu_cost.Workload("resnet20", "dpa", 1, 8, 10)
    dpa = gpu_cost.count_steps(w)
    same(dpa, gpu_cost.count_steps(w, execute=False))
    assert len(dpa["update"]) == 1 and len(dpa["ordinary"]) == 4
    assert dpa["update"][0].kernels > dpa["ordinary"][0].kernels  # the memory update's work
    assert all(s.syncs == 0 for s in first["ordinary"] + dpa["ordinary"] + dpa["update"])
    relu = gpu_cost.count_steps(gpu_cost.Workload("resnet20", "relu", 1, 8, 10))["ordinary"][0]
    assert not any("triton_kernels" in where for where in relu.by_line)
    assert first["ordinary"][0].kernels > relu.kernels and (first["sites"], dpa["sites"]) == (10, 19)
    # DPA's targets, per site beyond ReLU's step: ordinary steps <= 2 kernels and <= 6 host calls, the
    # mean over an interval (its update step included) <= 6 and <= 12
    steps, sites = dpa["ordinary"] + dpa["update"], dpa["sites"]
    ordinary = dpa["ordinary"][0]
    assert (ordinary.kernels - relu.kernels) / sites <= 2 and (ordinary.host_calls - relu.host_calls) / sites <= 6
    assert (sum(s.kernels for s in steps) / len(steps) - relu.kernels) / sites <= 6
    assert (sum(s.host_calls for s in steps) / len(steps) - relu.host_calls) / sites <= 12


@pytest.mark.slow
def test_conv_bn_iieu_b_sites_meet_their_per_site_targets(emulated):
    """IIEU-B in the paper's ResNet-26 placement (every site a conv-BN site) against ReLU, per site: at
    most 12 kernels and 25 host calls beyond ReLU's (10 and 24.1 when written: the site's statistics in
    one buffer, three launches for them, the forward, two passes back through the BatchNorm with two
    small launches between them, the patch norms' two and the filters' gradient); no host sync."""
    sites, syncs, kernels, host_calls = _extra_per("sites", "resnet26", 32, "relu", "iieu_b")
    assert sites == 29 and syncs == 0
    assert kernels <= 12 and host_calls <= 25



@pytest.mark.slow
def test_linear_iieu_b_sites_meet_their_targets_on_vit_tiny(emulated):
    """IIEU-B at ViT-Tiny/4's MLP sites (norm-less Linear sites) against ReLU, at batch 256, 32x32, 100
    classes: at most 10 % more bytes a step, 12 kernels and 25 host calls per site beyond ReLU's (1.091x,
    8 and 23 when written: the statistics and the forward in two launches, x_t recomputed (the bias' cast
    and one product), three backward launches, x_pre's gradient in the tap's pass, autograd's sums of the
    Linear's weight and bias gradients); no host sync."""
    report = gpu_cost.compare("vit_tiny", "iieu_b", 256, 32, 100, execute=False)
    assert report["sites"] == 12 and report["ordinary"]["syncs"] == 0
    assert report["ordinary"]["bytes_vs_relu"] <= 1.10
    assert report["ordinary"]["extra_per_site"]["kernels"] <= 12
    assert report["ordinary"]["extra_per_site"]["host_calls"] <= 25

def _extra_per(unit: str, model: str, image: int, base: str, act: str):
    """One counted ordinary step (batch 2) of ``act`` against ``base`` in ``model``: the number of its
    ``unit`` ("sites" or "fusions"), its device syncs, and its extra kernels and host calls per unit."""
    counts = {a: gpu_cost.count_steps(gpu_cost.Workload(model, a, 2, image, 10), execute=False) for a in (base, act)}
    n = counts[act][unit]
    step, ref = counts[act]["ordinary"][0], counts[base]["ordinary"][0]
    return n, step.syncs, (step.kernels - ref.kernels) / n, (step.host_calls - ref.host_calls) / n


def test_the_coupler_meets_its_targets_per_fusion(emulated):
    """IIEU-DC against IIEU-B in the same network, per fusion: at most 12 kernels and 25 host calls beyond
    the plain add (5 and 25 when written: pooling, weight network and weighted sum forward; sums, the
    network's backward, and the branch gradients with the parameter gradients in one launch; one buffer
    for the forward's state, one for backward's work with the one-dimensional parameter gradients in it,
    two for the other parameter gradients, the two branch gradients, autograd saving the output and
    handing the 9 parameters their gradients); no host sync."""
    fusions, syncs, kernels, host_calls = _extra_per("fusions", "resnet20", 8, "iieu_b", "iieu_dc")
    assert fusions == 9 and syncs == 0
    assert kernels <= 12 and host_calls <= 25


def test_the_committed_suite_counts_are_the_current_codes(emulated):
    """model_speed prints the committed counts beside its GPU rows: two of them (ViT-Tiny/4 with ReLU, and
    with DPA, ordinary and interval) counted afresh here equal the committed entries, so a change to the CUDA path
    that moves the counts fails until the table is written again (``gpu_cost --suite gpu --json``)."""
    from actlab.perf import model_speed

    case = next(c for c in model_speed.SUITES["gpu"] if c.model == "vit_tiny")
    case = model_speed.Case(case.model, case.batch, case.image_size, ("dpa",), case.num_classes)
    fresh = gpu_cost.suite_counts([case])
    keys = {model_speed.count_key(case, "dpa"), model_speed.count_key(case, "relu")}
    assert set(fresh) == keys
    committed = model_speed._counts()
    assert fresh[model_speed.count_key(case, "dpa")].keys() == {"ordinary", "interval"}
    for key in keys:
        assert fresh[key].keys() == committed[key].keys()
        for kind in committed[key]:
            assert fresh[key][kind].keys() == committed[key][kind].keys()
            for name, value in committed[key][kind].items():
                assert fresh[key][kind][name] == pytest.approx(value, rel=1e-9), (key, kind, name)


def test_counting_with_skipped_kernels_refuses_a_step_that_syncs(emulated, monkeypatch):
    """A step that reads a value back could launch differently on real values: without executing the
    kernels it is refused, with them it is counted (the sync included)."""
    step = gpu_cost._step

    def syncing_step(model, optimizer, x, y):
        step(model, optimizer, x, y)
        float(torch.ones(2).sum())

    monkeypatch.setattr(gpu_cost, "_step", syncing_step)
    w = gpu_cost.Workload("resnet20", "relu", 1, 8, 10)
    with pytest.raises(RuntimeError, match="reads values back to the host"):
        gpu_cost.count_steps(w, execute=False)
    assert gpu_cost.count_steps(w, execute=True)["ordinary"][0].syncs == 1


def test_extrapolation_is_fixed_plus_per_sample():
    assert gpu_cost.extrapolate({"bytes": 10.0}, {"bytes": 14.0}, 1, 2, 128) == {"bytes": 6.0 + 4.0 * 128}


def test_the_command_line_refuses_what_it_cannot_count(capsys):
    assert gpu_cost.main(["--model", "resnet20", "--act", "iieu_b", "--measure", "2,1"]) == 2
    assert "--measure takes two increasing batches" in capsys.readouterr().err
    assert gpu_cost.main(["--model", "resnet20", "--act", "iieu_b"]) == 2  # not emulating
    assert "ACTLAB_EMULATE_CUDA=1" in capsys.readouterr().err
