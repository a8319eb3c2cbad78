"""Forward+backward time and bytes saved for backward of every activation, relative to ReLU.

Two workloads, run side by side on the same inputs:
  conv: two Conv3x3(64->64) + BN + act layers on a (32, 64, 32, 32) batch;
  mlp:  a ViT MLP block, (32, 65, 192) -> Linear 768 -> act -> Linear 192.
Each activation is swapped in with ``actlab.convert``; timings are interleaved round-robin across
activations so that drift of the machine affects all of them alike, and "x ReLU time" is the median over
rounds of each round's ratio to ReLU's step in the same round. DPA is timed as a training step with targets
(memory updates every 5th step, as in training) and, separately, in eval mode.

IIEU-B's C++ kernels skip the exponential of the adjuster's lower branch wherever no response of a
vector of 8 lies below eta, as on this random workload at eta's initial 0.05. ``--iieu-eta 10`` puts
every response below it: the kernels' worst case.

    python -m actlab.perf.speed [--repeats 20] [--acts relu,iieu_b,dpa] [--iieu-eta 10] [--json out.json]

With ``--device cuda`` it runs the whole-model GPU suite of ``actlab.perf.model_speed`` instead.
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

import actlab
from ..activations import IIEUB
from ..machine import FIGURES_HELP, command_line, record_figure, summary
from .timing import saved_bytes, time_interleaved

NUM_CLASSES = 10


def conv_workload() -> tuple[nn.Module, torch.Tensor]:
    layers = []
    for _ in range(2):
        layers += [nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    return nn.Sequential(*layers), torch.randn(32, 64, 32, 32)


def mlp_workload() -> tuple[nn.Module, torch.Tensor]:
    return nn.Sequential(nn.Linear(192, 768), nn.GELU(), nn.Linear(768, 192)), torch.randn(32, 65, 192)


WORKLOADS = {"conv": conv_workload, "mlp": mlp_workload}


def make_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, train: bool):
    def step(backward: bool = True):
        if not train:
            with torch.no_grad():
                return model(x)
        with actlab.targets(model, labels):
            out = model(x)
        loss = out.square().mean() + actlab.dpa_loss(model)
        if backward:
            loss.backward()
        return loss

    return step


@dataclass
class Row:
    activation: str
    workload: str
    mode: str
    ms_median: float
    ms_iqr: float
    saved_mb: float
    sites: int
    time_vs_relu: float = float("nan")
    memory_vs_relu: float = float("nan")


def build_model(name: str, workload: str, iieu_eta: float | None = None) -> tuple[nn.Module, torch.Tensor, int]:
    """The workload's model with ``name`` swapped in, its input batch, and how many sites it took.
    ``iieu_eta``: set every IIEU-B threshold to this value (default: keep the initial one)."""
    torch.manual_seed(0)
    model, x = WORKLOADS[workload]()
    # converted for "relu" too: the MLP workload is built with GELU, and the baseline must be ReLU
    actlab.convert(model, name, num_classes=NUM_CLASSES, example_input=x[:2])
    sites = len(actlab.conversion_report(model).active)  # ReLU in a ReLU workload: kept, still a site
    if iieu_eta is not None:
        with torch.no_grad():
            for unit in model.modules():
                if isinstance(unit, IIEUB):
                    unit.eta.fill_(iieu_eta)
    return model, x, sites


def build(name: str, workload: str, device: torch.device, train: bool, iieu_eta: float | None = None):
    """The workload's training (or eval) step with ``name`` swapped in, and how many sites it took."""
    model, x, sites = build_model(name, workload, iieu_eta)
    model, x = model.to(device), x.to(device)
    model.train(train)
    labels = torch.randint(0, NUM_CLASSES, (x.shape[0],), device=device)
    return make_step(model, x, labels, train), sites


def run(acts: list[str], repeats: int, warmup: int, device: torch.device,
        workloads: tuple[str, ...] = tuple(WORKLOADS), iieu_eta: float | None = None) -> list[Row]:
    cases = [(a, w, "train") for w in workloads for a in acts]
    cases += [(a, w, "eval") for w in workloads for a in acts if a in ("relu", "dpa")]
    built = {c: build(c[0], c[1], device, c[2] == "train", iieu_eta) for c in cases}
    steps = {c: b[0] for c, b in built.items()}
    times = time_interleaved(steps, repeats, warmup, device)
    rows = []
    for c in cases:
        q = statistics.quantiles(times[c], n=4)
        mem = saved_bytes(lambda: steps[c](backward=False)) / 2**20 if c[2] == "train" else 0.0
        rows.append(Row(c[0], c[1], c[2], statistics.median(times[c]), q[2] - q[0], mem, built[c][1]))
    base = {(r.workload, r.mode): r for r in rows if r.activation == "relu"}
    for r, c in zip(rows, cases):
        ref = base.get((r.workload, r.mode))
        if ref:
            relu_times = times[("relu", c[1], c[2])]
            r.time_vs_relu = statistics.median(t / t_relu for t, t_relu in zip(times[c], relu_times))
            r.memory_vs_relu = r.saved_mb / ref.saved_mb if ref.saved_mb else float("nan")
    return rows


def markdown(rows: list[Row], repeats: int, device: torch.device) -> str:
    lines = [f"Machine: {summary(device)}; median of {repeats} interleaved runs (IQR in brackets); "
             "x ReLU time: median of the per-round ratios.", "",
             "| activation | workload | mode | sites | ms | x ReLU time | saved MB | x ReLU memory |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.sites == 0:
            lines.append(f"| {r.activation} | {r.workload} | - | 0 | not applicable to this workload | | | |")
            continue
        mode = "train step" if r.mode == "train" else "eval forward"
        mem = f"{r.saved_mb:.1f}" if r.mode == "train" else "-"
        memx = f"{r.memory_vs_relu:.2f}" if r.mode == "train" else "-"
        lines.append(f"| {r.activation} | {r.workload} | {mode} | {r.sites} | {r.ms_median:.1f} [{r.ms_iqr:.1f}] | "
                     f"{r.time_vs_relu:.2f} | {mem} | {memx} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m actlab.perf.speed``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--acts", default=",".join(actlab.list_activations()),
                        help="comma-separated activations (relu is always included as the baseline)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, of: " + ", ".join(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iieu-eta", type=float, default=None,
                        help="set every IIEU-B threshold eta to this value (10: every response below it, the "
                             "kernels' worst case; default: the initial 0.05)")
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    parser.add_argument("--figures", metavar="FOLDER", help=FIGURES_HELP)
    return parser


def main(argv: list[str] | None = None) -> list[Row]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):  # on a GPU: the whole-model training steps (model_speed)
        from . import model_speed

        return model_speed.main(["--device", args.device, "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
                                + (["--json", args.json] if args.json else []))
    acts = [a.strip() for a in args.acts.split(",") if a.strip()]
    for a in acts:
        actlab.activations.get_spec(a)  # unknown names fail before any work
    acts = ["relu"] + [a for a in acts if a != "relu"]
    workloads = tuple(w.strip() for w in args.workloads.split(",") if w.strip())
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    device = torch.device(args.device)
    rows = run(acts, args.repeats, args.warmup, device, workloads, args.iieu_eta)
    table = markdown(rows, args.repeats, device)
    print(table)
    if args.figures:
        record_figure(args.figures, command_line("actlab.perf.speed", argv), table, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": summary(device), "repeats": args.repeats, "iieu_eta": args.iieu_eta,
                       "rows": [asdict(r) for r in rows]}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
