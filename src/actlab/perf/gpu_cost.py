"""GPU cost model: what one training step gives a GPU, counted on the CPU.

One bf16 training step (forward with targets, cross-entropy plus DPA's channel loss, backward, a
multi-tensor optimizer step as on CUDA) runs on the CUDA code path with CPU tensors
(``ACTLAB_EMULATE_CUDA=1`` with Triton's interpreter). Every aten operation and every Triton launch is
recorded: host calls (every dispatched operation and launch), kernel launches (operations that run a
kernel: not views or allocations), bytes read and written (each operation's tensor arguments and
results, broadcast dimensions counted once; a Triton launch's tensor arguments), host syncs
(``item()``-style reads) and the actlab source line that issued it.

    TRITON_INTERPRET=1 ACTLAB_EMULATE_CUDA=1 python -m actlab.perf.gpu_cost --model resnet26 --act iieu_b \\
        [--batch 128 --image 224 --classes 1000] [--json cost.json]
    TRITON_INTERPRET=1 ACTLAB_EMULATE_CUDA=1 python -m actlab.perf.gpu_cost --suite gpu \\
        --json src/actlab/perf/gpu_counts.json   # the per-site counts model_speed prints beside its rows

Triton launches are counted and skipped by default (``--execute-kernels`` runs them, under the
interpreter: slow): what a step launches cannot depend on values it never reads back, and a step that
reads one (a host sync) is refused without ``--execute-kernels``. The step is counted at two small batches (``--measure 1,2``) and extrapolated to ``--batch``: a fixed
part (weights, optimizer) and a per-sample part. Counts are deterministic, so tests pin them. The
roofline estimate of a step is the larger of its bytes at ``--bandwidth`` and its host calls at
``--host-us`` each (an eager step is bound by one or the other). Approximations: the aten ops are the
CPU dispatcher's (cuDNN's fused ops may differ in count), a multi-tensor (``_foreach``) op counts one
kernel, and bytes assume each tensor argument is read or written once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..machine import FIGURES_HELP, command_line, record_figure

ATEN = torch.ops.aten
ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "scalar_tensor"}
NO_KERNEL = {"detach", "alias", "lift_fresh", "_unsafe_view", "_reshape_alias", "set_", "resize_"} | ALLOCATIONS
WRITE_ONLY = {"zero_", "fill_", "zeros", "ones", "full", "zeros_like", "ones_like", "full_like"}
_SRC = os.sep + "actlab" + os.sep
OPTIMIZER = "torch optimizer"  # its step counters live on the host on CUDA: reading them is no device sync
_HERE = os.path.abspath(__file__)


def tensor_bytes(t: torch.Tensor) -> int:
    """The distinct bytes a kernel touches in ``t``: broadcast (stride 0) dimensions counted once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def _tensors(*trees) -> list[torch.Tensor]:
    flat = []
    for tree in trees:
        flat += [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]
    return flat


def _where() -> str:
    """The innermost actlab source line on the Python stack (outside this file); in autograd's backward of
    a torch operation the backward node's name; else the torch module."""
    node = torch._C._current_autograd_node()
    frame = sys._getframe(2)
    fallback = ""
    while frame is not None:
        name = frame.f_code.co_filename
        if _SRC in name and os.path.abspath(name) != _HERE:
            return f"{name[name.index(_SRC) + 1:]}:{frame.f_lineno}"
        if not fallback and (os.sep + "torch" + os.sep) in name and (os.sep + "optim" + os.sep) in name:
            fallback = OPTIMIZER
        elif not fallback and (os.sep + "torch" + os.sep) in name and ("nn" + os.sep) in name:
            fallback = f"torch {os.path.basename(name)}:{frame.f_lineno}"
        frame = frame.f_back
    if node is not None:
        return f"backward {node.name()}"
    return fallback or "other"


@dataclass
class Call:
    """One host call: an aten operation or a Triton launch."""

    name: str
    kernels: int
    bytes: int
    where: str
    sync: bool = False


class CostCounter(TorchDispatchMode):
    """Records every aten operation dispatched inside it and every launch of actlab's Triton kernels
    (the Triton interpreter's own tensor work is not recorded: a GPU does not do it).

    Args:
        execute: run the Triton kernels (under the interpreter, slow). Without it a launch is recorded and
            skipped, leaving its outputs unwritten: the counts are the same as long as no host sync lets
            a value steer the host's control flow, which ``syncs`` shows (a counted step with a sync
            must be counted with ``execute=True``)."""

    def __init__(self, execute: bool = True):
        super().__init__()
        self.execute = execute
        self.calls: list[Call] = []
        self._inside_launch = 0
        self._patched: list = []

    def __enter__(self):
        self._patch_triton()
        return super().__enter__()

    def __exit__(self, *exc):
        for kernel, original in self._patched:
            kernel.run = original
        self._patched.clear()
        return super().__exit__(*exc)

    def _patch_triton(self) -> None:
        from ..activations.kernels import triton_kernels

        for name, kernel in vars(triton_kernels).items():
            run = getattr(kernel, "run", None)
            if name.startswith("_") and callable(run) and hasattr(kernel, "fn"):
                kernel.run = self._launcher(name, run)
                self._patched.append((kernel, run))

    def _launcher(self, name: str, run):
        def launch(*args, **kwargs):
            # a tensor passed twice (an unused pointer argument aliasing another) is moved once
            distinct = {(t.data_ptr(), t.dtype, tuple(t.shape)): t for t in _tensors(args, kwargs)}
            touched = sum(tensor_bytes(t) for t in distinct.values())
            self.calls.append(Call(f"triton {name}", 1, touched, _where()))
            if not self.execute:
                return None
            self._inside_launch += 1
            try:
                return run(*args, **kwargs)
            finally:
                self._inside_launch -= 1
        return launch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self._inside_launch:
            self.calls.append(self._classify(func, args, kwargs or {}, out))
        return out

    @staticmethod
    def _classify(func, args, kwargs, out) -> Call:
        name = func._schema.name.split("::")[-1]
        if func is ATEN._local_scalar_dense.default:
            where = _where()
            return Call(name, 0, 0, where, sync=where != OPTIMIZER)
        if func.is_view or name in NO_KERNEL:
            return Call(name, 0, 0, _where())
        written = sum(tensor_bytes(t) for t in _tensors(out))
        read = 0 if name in WRITE_ONLY else sum(tensor_bytes(t) for t in _tensors(args, kwargs))
        return Call(name, 1, read + written, _where())


@dataclass
class StepCount:
    """The totals of one counted step."""

    host_calls: int
    kernels: int
    bytes: int
    syncs: int
    by_line: dict = field(default_factory=dict)  # where -> [kernels, bytes]

    @classmethod
    def of(cls, calls: list[Call]) -> "StepCount":
        by_line: dict = defaultdict(lambda: [0, 0])
        for c in calls:
            by_line[c.where][0] += c.kernels
            by_line[c.where][1] += c.bytes
        return cls(len(calls), sum(c.kernels for c in calls), sum(c.bytes for c in calls),
                   sum(c.sync for c in calls), dict(by_line))


@dataclass(frozen=True)
class Workload:
    """One counted training step: model, activation, batch, image size, classes."""

    model: str
    act: str
    batch: int
    image: int
    classes: int = 1000


def _build(w: Workload):
    import actlab
    from ..models import create_model, get_model_spec
    from ..train.optim import build_optimizer

    torch.manual_seed(0)
    model = create_model(w.model, w.act, w.classes, image_size=w.image)
    transformer = get_model_spec(w.model).family == "transformer"
    optimizer = build_optimizer(model, "adamw" if transformer else "sgd", 1e-3, 0.05 if transformer else 1e-4)
    for group in optimizer.param_groups:
        group["foreach"] = True  # CUDA's default: multi-tensor kernels
    sites = sum(isinstance(m, actlab.activations.ActivationModule) and not isinstance(m, actlab.DynamicCoupler)
                for m in model.modules())
    fusions = sum(isinstance(m, actlab.DynamicCoupler) for m in model.modules())
    return model, optimizer, sites, fusions


def _step(model, optimizer, x, y) -> None:
    import actlab

    with torch.autocast("cpu", dtype=torch.bfloat16):
        with actlab.targets(model, y):  # labels checked on the device, as on a GPU: no host read
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y) + actlab.dpa_loss(model)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _dpa_sites(model) -> list:
    from ..activations.dpa import DPA

    return [m for m in model.modules() if isinstance(m, DPA)]


def count_steps(w: Workload, steps: int | None = None, execute: bool = True) -> dict:
    """Count the training steps of one workload after one uncounted warm-up step (optimizer state made).
    Steps: one, or one DPA interval (update and ordinary steps told apart) where the model has DPA.
    ``execute``: run the Triton kernels (see ``CostCounter``); without it a step that syncs is an error."""
    from ..activations.kernels import emulating_cuda

    if not emulating_cuda() or os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("gpu_cost counts the CUDA code path: run with TRITON_INTERPRET=1 ACTLAB_EMULATE_CUDA=1")
    model, optimizer, sites, fusions = _build(w)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(w.batch, 3, w.image, w.image, generator=g)
    y = torch.randint(0, w.classes, (w.batch,), generator=g)
    with CostCounter(execute):
        _step(model, optimizer, x, y)
    dpa_sites = _dpa_sites(model)
    steps = steps or (dpa_sites[0].interval if dpa_sites else 1)
    ordinary, update = [], []
    for _ in range(steps):
        with CostCounter(execute) as counter:
            _step(model, optimizer, x, y)
        is_update = bool(dpa_sites) and dpa_sites[0].position == 0
        count = StepCount.of(counter.calls)
        if count.syncs and not execute:
            raise RuntimeError(f"{w.model} + {w.act}: the step reads values back to the host ({count.syncs} syncs), so "
                               "skipped kernels could change what it launches: count with --execute-kernels")
        (update if is_update else ordinary).append(count)
    return {"sites": sites, "fusions": fusions, "ordinary": ordinary, "update": update}


def _mean(counts: list[StepCount]) -> dict:
    keys = ("host_calls", "kernels", "bytes", "syncs")
    return {k: sum(getattr(c, k) for c in counts) / len(counts) for k in keys}


def extrapolate(small: dict, large: dict, b_small: int, b_large: int, batch: int) -> dict:
    """Counts at ``batch`` from counts at two batches: fixed + per-sample * batch, per key."""
    out = {}
    for k in small:
        per_sample = (large[k] - small[k]) / (b_large - b_small)
        out[k] = small[k] - per_sample * b_small + per_sample * batch
    return out


def workload_cost(model: str, act: str, batch: int, image: int, classes: int, measure: tuple[int, int],
                  execute: bool = True) -> dict:
    """One activation's step at ``batch``: ordinary steps, update steps and the interval mean (DPA), each
    extrapolated from the two measured batches; the largest source lines at the larger measured batch."""
    runs = {b: count_steps(Workload(model, act, b, image, classes), execute=execute) for b in measure}
    first, second = runs[measure[0]], runs[measure[1]]
    result = {"sites": first["sites"], "fusions": first["fusions"]}
    for kind in ("ordinary", "update"):
        if first[kind]:
            result[kind] = extrapolate(_mean(first[kind]), _mean(second[kind]), *measure, batch)
    if first["update"]:
        every = first["ordinary"] + first["update"]
        every_large = second["ordinary"] + second["update"]
        result["interval"] = extrapolate(_mean(every), _mean(every_large), *measure, batch)
    lines = Counter()
    kernels = Counter()
    for c in second["ordinary"] + second["update"]:
        for where, (k, b) in c.by_line.items():
            lines[where] += b
            kernels[where] += k
    steps = len(second["ordinary"] + second["update"])
    result["by_line"] = [(where, kernels[where] / steps, lines[where] / steps) for where, _ in lines.most_common(12)]
    return result


def roofline_ms(counts: dict, bandwidth: float, host_us: float) -> dict:
    device = counts["bytes"] / bandwidth * 1e3
    host = counts["host_calls"] * host_us / 1e3
    return {"device_ms": device, "host_ms": host, "step_ms": max(device, host)}


def compare(model: str, act: str, batch: int, image: int, classes: int, measure=(1, 2), bandwidth: float = 4.8e12,
            host_us: float = 20.0, execute: bool = True) -> dict:
    """``act`` against ReLU in the same architecture: totals, extra bytes / kernels / host calls per site
    (per fusion for the coupler, against IIEU-B), the largest source lines and roofline estimates."""
    relu = workload_cost(model, "relu", batch, image, classes, measure, execute)
    mine = workload_cost(model, act, batch, image, classes, measure, execute)
    base = relu["ordinary"]
    report = {"workload": asdict(Workload(model, act, batch, image, classes)), "measured_batches": list(measure),
              "bandwidth": bandwidth, "host_us": host_us, "relu": base, "sites": mine["sites"],
              "fusions": mine["fusions"], "by_line": mine["by_line"]}
    for kind in ("ordinary", "update", "interval"):
        if kind not in mine:
            continue
        counts = mine[kind]
        extra = {k: counts[k] - base[k] for k in counts}
        report[kind] = {**counts, "extra": extra, "bytes_vs_relu": counts["bytes"] / base["bytes"],
                        "extra_per_site": {k: extra[k] / max(mine["sites"], 1) for k in ("kernels", "host_calls")},
                        "roofline": roofline_ms(counts, bandwidth, host_us)}
    report["relu_roofline"] = roofline_ms(base, bandwidth, host_us)
    if mine["fusions"]:
        iieu = workload_cost(model, "iieu_b", batch, image, classes, measure, execute)["ordinary"]
        report["coupler_per_fusion"] = {k: (mine["ordinary"][k] - iieu[k]) / mine["fusions"]
                                        for k in ("kernels", "host_calls", "bytes")}
    return report


def suite_counts(cases, measure=(1, 2), execute: bool = False) -> dict:
    """The counts of every step of ``cases`` (``model_speed.Case``s), ReLU's included, keyed as
    ``model_speed.count_key``: {"ordinary": {...}, "interval": {...} (DPA)}, each with the step's bytes,
    kernels and host calls, extrapolated to the case's batch, and (not for ReLU) its extra kernels and host
    calls per site beyond ReLU's step and its bytes against ReLU's."""
    from .model_speed import count_key

    out = {}
    for case in cases:
        size = (case.batch, case.image_size, case.num_classes, measure)
        base = workload_cost(case.model, "relu", *size, execute)["ordinary"]
        out[count_key(case, "relu")] = {"ordinary": _absolute(base)}
        for act in case.acts:
            mine = workload_cost(case.model, act, *size, execute)
            sites = max(mine["sites"], 1)
            out[count_key(case, act)] = {
                kind: {**_absolute(mine[kind]),
                       "kernels_per_site": (mine[kind]["kernels"] - base["kernels"]) / sites,
                       "host_calls_per_site": (mine[kind]["host_calls"] - base["host_calls"]) / sites,
                       "bytes_vs_relu": mine[kind]["bytes"] / base["bytes"]}
                for kind in ("ordinary", "interval") if kind in mine}
    return out


def suite_table(counts: dict) -> list[str]:
    """``suite_counts`` as markdown lines: one row per counted step (DPA's interval mean its own row)."""
    lines = ["| case | step | GB | kernels | host calls | extra kernels / site | extra host calls / site | "
             "x ReLU bytes |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key, entry in counts.items():
        for kind, e in entry.items():
            extra = (f"{e['kernels_per_site']:.1f} | {e['host_calls_per_site']:.1f} | {e['bytes_vs_relu']:.3f}"
                     if "kernels_per_site" in e else "- | - | -")
            lines.append(f"| {key} | {kind} | {e['bytes'] / 1e9:.2f} | {e['kernels']:.0f} | {e['host_calls']:.0f} | "
                         f"{extra} |")
    return lines


def _absolute(counts: dict) -> dict:
    return {"bytes": counts["bytes"], "kernels": counts["kernels"], "host_calls": counts["host_calls"]}


def table(report: dict) -> str:
    """The report as a few markdown lines."""
    w = report["workload"]
    lines = [f"{w['model']} + {w['act']}, batch {w['batch']}, {w['image']}x{w['image']}, bf16 "
             f"({report['sites']} sites{', ' + str(report['fusions']) + ' fusions' if report['fusions'] else ''}); "
             f"ReLU step {report['relu']['bytes'] / 1e9:.1f} GB, {report['relu']['kernels']:.0f} kernels, "
             f"{report['relu']['host_calls']:.0f} host calls",
             "", "| step | GB | extra GB | x ReLU bytes | extra kernels / site | extra host calls / site | syncs | "
             "roofline ms (ReLU) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in ("ordinary", "update", "interval"):
        if kind in report:
            r = report[kind]
            lines.append(f"| {kind} | {r['bytes'] / 1e9:.1f} | {r['extra']['bytes'] / 1e9:+.1f} | "
                         f"{r['bytes_vs_relu']:.3f} | {r['extra_per_site']['kernels']:.1f} | "
                         f"{r['extra_per_site']['host_calls']:.1f} | {r['syncs']:.0f} | "
                         f"{r['roofline']['step_ms']:.1f} ({report['relu_roofline']['step_ms']:.1f}) |")
    if "coupler_per_fusion" in report:
        c = report["coupler_per_fusion"]
        lines += ["", f"Coupler per fusion (IIEU-DC minus IIEU-B): {c['kernels']:.1f} kernels, {c['host_calls']:.1f} "
                  f"host calls, {c['bytes'] / 1e9:.2f} GB"]
    lines += ["", "Largest items (per step, at the larger measured batch):", "",
              "| where | kernels | MB |", "|---|---:|---:|"]
    lines += [f"| {where} | {k:.0f} | {b / 1e6:.1f} |" for where, k, b in report["by_line"][:8]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m actlab.perf.gpu_cost``."""
    p = argparse.ArgumentParser(prog="python -m actlab.perf.gpu_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a zoo model (with --act)")
    p.add_argument("--act", help="the activation compared with ReLU")
    p.add_argument("--suite", choices=("gpu",), help="instead of --model/--act: every case of model_speed's GPU "
                   "suite at its batch and size, per-site counts only (what model_speed prints beside its timings)")
    p.add_argument("--batch", type=int, default=128, help="the batch the counts are extrapolated to")
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--measure", default="1,2", help="the two batches that are counted")
    p.add_argument("--bandwidth", type=float, default=4.8e12, help="bytes/s for the roofline (H200: 4.8e12)")
    p.add_argument("--host-us", type=float, default=20.0, help="host time per call, microseconds")
    p.add_argument("--execute-kernels", action=argparse.BooleanOptionalAction, default=False,
                   help="run the Triton kernels under the interpreter (minutes to hours); by default launches are "
                        "counted and skipped, which gives the same counts for a step without host syncs")
    p.add_argument("--json", help="write the report here as JSON")
    p.add_argument("--figures", metavar="FOLDER", help=FIGURES_HELP)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        measure = tuple(int(b) for b in args.measure.split(","))
        if len(measure) != 2 or not 0 < measure[0] < measure[1]:
            raise ValueError
    except ValueError:
        print(f"gpu_cost: error: --measure takes two increasing batches like 1,2, got {args.measure!r}", file=sys.stderr)
        return 2
    if args.suite:
        return _suite_main(args.suite, measure, args.execute_kernels, args.json,
                           args.figures and (args.figures, command_line("actlab.perf.gpu_cost", argv)))
    if not (args.model and args.act):
        print("gpu_cost: error: give --model and --act, or --suite", file=sys.stderr)
        return 2
    try:
        report = compare(args.model, args.act, args.batch, args.image, args.classes, measure, args.bandwidth,
                         args.host_us, args.execute_kernels)
    except (ValueError, RuntimeError) as exc:
        print(f"gpu_cost: error: {exc}", file=sys.stderr)
        return 2
    print(table(report))
    if args.figures:
        record_figure(args.figures, command_line("actlab.perf.gpu_cost", argv), table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def _suite_main(suite: str, measure: tuple, execute: bool, path: str | None, figures: tuple[str, str] | None) -> int:
    from .model_speed import SUITES

    try:
        counts = suite_counts(SUITES[suite], measure, execute)
    except (ValueError, RuntimeError) as exc:
        print(f"gpu_cost: error: {exc}", file=sys.stderr)
        return 2
    lines = suite_table(counts)
    print("\n".join(lines))
    if figures:
        record_figure(figures[0], figures[1], "\n".join(lines))
    if path:
        with open(path, "w") as f:
            json.dump(counts, f, indent=1, sort_keys=True)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
