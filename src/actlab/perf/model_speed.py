"""Whole-model training steps of IIEU-B, IIEU-DC and DPA side by side with ReLU.

Each case is one architecture at one batch and input size, built once per activation; the steps
(forward with targets, loss with DPA's channel loss, backward, SGD step) run interleaved round-robin, and
"x ReLU time" is the median over rounds of each round's ratio to ReLU's step in the same round. Memory is
the peak allocated during a step (``torch.cuda.max_memory_allocated`` above what the model and optimizer
already hold) on CUDA, and the bytes saved for backward on the CPU.

Suites:
  gpu: IIEU paper ResNet-26 and ResNet-50 (its placement) at batch 128, 224x224; ViT-Tiny/4 at 32x32,
       batch 256; bf16 autocast; eager and torch.compile.
  cpu: IIEU paper ResNet-26 training steps at batch 16, 64x64 and batch 8, 224x224, float32, eager.

Beside each bf16 eager row of the gpu suite stand the GPU cost model's counts for that step (extra
kernels and host calls per site beyond ReLU's; DPA also over an interval), read from ``gpu_counts.json``
next to this file, which ``python -m actlab.perf.gpu_cost --suite gpu --json ...`` writes.

    python -m actlab.perf.model_speed --suite gpu [--repeats 20] [--compile both|eager|compiled] [--json F]
    python -m actlab.perf.model_speed --suite gpu --profile resnet26:iieu_b,resnet26:relu
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

import actlab
from actlab.models import create_model

from ..machine import FIGURES_HELP, command_line, record_figure, summary
from .timing import saved_bytes, time_interleaved

NUM_CLASSES = 1000
DPA_INTERVAL = 5  # DPA's default: one update step in every five training steps
COUNTS = Path(__file__).with_name("gpu_counts.json")  # the cost model's counts of the gpu suite's eager steps


@dataclass(frozen=True)
class Case:
    """One architecture at one size; ``acts`` are compared against ReLU."""

    model: str
    batch: int
    image_size: int
    acts: tuple[str, ...]
    num_classes: int = NUM_CLASSES

    @property
    def label(self) -> str:
        return f"{self.model}, batch {self.batch}, {self.image_size}x{self.image_size}"


SUITES = {
    "gpu": (Case("resnet26", 128, 224, ("iieu_b", "iieu_dc")),
            Case("resnet50", 128, 224, ("iieu_b", "iieu_dc", "dpa")),
            Case("vit_tiny", 256, 32, ("iieu_b", "dpa"), num_classes=100)),
    "cpu": (Case("resnet26", 16, 64, ("iieu_b", "iieu_dc")),
            Case("resnet26", 8, 224, ("iieu_b", "iieu_dc"))),
}


@dataclass
class Row:
    case: str
    activation: str
    compiled: bool
    precision: str
    ms_median: float
    ms_iqr: float
    memory_mb: float
    time_vs_relu: float = float("nan")
    memory_vs_relu: float = float("nan")
    ms_mean: float = float("nan")          # over whole DPA intervals of rounds (update steps included)
    mean_vs_relu: float = float("nan")     # that mean against ReLU's over the same rounds
    counted: dict | None = None            # the cost model's per-site counts of this step (bf16 eager), if any

    def counted_cell(self) -> str:
        """'kernels / host calls' per site beyond ReLU's, ordinary steps (and DPA's interval mean)."""
        if not self.counted:
            return "-"
        cells = [f"{e['kernels_per_site']:.1f} / {e['host_calls_per_site']:.1f}" for e in self.counted.values()]
        return cells[0] + (f" (interval {cells[1]})" if len(cells) > 1 else "")


def count_key(case: "Case", act: str) -> str:
    """How the counts table names one activation of one case."""
    return f"{case.model}/{act}/{case.batch}/{case.image_size}/{case.num_classes}"


@cache
def _counts() -> dict:
    return json.loads(COUNTS.read_text()) if COUNTS.exists() else {}


def counted(case: "Case", act: str, dtype: torch.dtype | None, compiled: bool) -> dict | None:
    """The cost model's counts of this step: bf16 eager steps of the counted cases only."""
    if compiled or dtype != torch.bfloat16:
        return None
    return _counts().get(count_key(case, act))


class TrainingStep:
    """One model's training step on fixed random data (what the timing loop calls)."""

    def __init__(self, case: Case, act: str, device: torch.device, dtype: torch.dtype | None, compiled: bool):
        torch.manual_seed(0)
        self.model = create_model(case.model, act, case.num_classes, image_size=case.image_size).to(device)
        self.x = torch.randn(case.batch, 3, case.image_size, case.image_size, device=device)
        self.y = torch.randint(0, case.num_classes, (case.batch,), device=device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)
        self.forward = torch.compile(self.model) if compiled else self.model
        self.device, self.dtype = device, dtype

    def loss(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            with actlab.targets(self.model, self.y, validate=False):
                logits = self.forward(self.x)
            return F.cross_entropy(logits.float(), self.y) + actlab.dpa_loss(self.model)

    def __call__(self) -> None:
        loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def memory_mb(self) -> float:
        """Peak bytes a step adds on CUDA; bytes saved for backward on the CPU."""
        if self.device.type != "cuda":
            return saved_bytes(self.loss) / 2**20
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        self()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20


def run_case(case: Case, device: torch.device, dtype: torch.dtype | None, compiled: bool, repeats: int,
             warmup: int) -> list[Row]:
    acts = ("relu", *case.acts)
    steps = {act: TrainingStep(case, act, device, dtype, compiled) for act in acts}
    times = time_interleaved(steps, repeats, warmup, device)
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    rows = []
    for act in acts:
        q = statistics.quantiles(times[act], n=4)
        rows.append(Row(case.label, act, compiled, precision, statistics.median(times[act]), q[2] - q[0],
                        steps[act].memory_mb(), counted=counted(case, act, dtype, compiled)))
    relu = rows[0]
    whole = DPA_INTERVAL * (repeats // DPA_INTERVAL) or repeats  # rounds that hold whole DPA intervals
    for row in rows:
        row.time_vs_relu = statistics.median(t / r for t, r in zip(times[row.activation], times["relu"]))
        row.memory_vs_relu = row.memory_mb / relu.memory_mb if relu.memory_mb else float("nan")
        row.ms_mean = statistics.fmean(times[row.activation][:whole])
        row.mean_vs_relu = row.ms_mean / statistics.fmean(times["relu"][:whole])
    del steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[Row], repeats: int, device: torch.device) -> str:
    memory = "peak MB" if device.type == "cuda" else "saved MB"
    lines = [f"Machine: {summary(device)}; median of {repeats} interleaved training steps (IQR in brackets); "
             "x ReLU: median of the per-round ratios; mean: over whole DPA intervals of rounds (its update steps "
             "included), against ReLU's mean over the same rounds; counted: the GPU cost model's extra kernels / host "
             "calls per site beyond ReLU's step (bf16 eager).", "",
             f"| case | activation | mode | ms | x ReLU time | mean ms (x ReLU) | {memory} | x ReLU memory | counted |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mode = f"{r.precision}, {'compiled' if r.compiled else 'eager'}"
        lines.append(f"| {r.case} | {r.activation} | {mode} | {r.ms_median:.1f} [{r.ms_iqr:.1f}] | {r.time_vs_relu:.2f} | "
                     f"{r.ms_mean:.1f} ({r.mean_vs_relu:.2f}) | {r.memory_mb:.0f} | {r.memory_vs_relu:.2f} | "
                     f"{r.counted_cell()} |")
    return "\n".join(lines)


def profile(case: Case, act: str, device: torch.device, dtype: torch.dtype | None, steps: int = 3,
            rows: int = 25) -> str:
    """The PyTorch profiler's kernel table for a few eager training steps of one activation (after two warm-ups)."""
    step = TrainingStep(case, act, device, dtype, compiled=False)
    for _ in range(2):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return f"{case.label}, {act}, {steps} steps:\n" + prof.key_averages().table(sort_by=sort, row_limit=rows)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m actlab.perf.model_speed``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=list(SUITES), default=None,
                        help="gpu (default on CUDA) or cpu (default otherwise)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=None, help="comma-separated subset of the suite's models")
    parser.add_argument("--compile", choices=("both", "eager", "compiled"), default=None,
                        help="default: both on CUDA, eager on the CPU")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new case after this many seconds (the first always runs; the rest are listed as skipped)")
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    parser.add_argument("--figures", metavar="FOLDER", help=FIGURES_HELP)
    parser.add_argument("--profile", metavar="MODEL:ACT[,MODEL:ACT]",
                        help="print the profiler's kernel table for these eager steps instead of timing the suite")
    return parser


def main(argv: list[str] | None = None) -> list[Row]:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    suite = args.suite or ("gpu" if device.type == "cuda" else "cpu")
    cases = SUITES[suite]
    if args.models:
        wanted = {m.strip() for m in args.models.split(",")}
        unknown = wanted - {c.model for c in cases}
        if unknown:
            parser.error(f"models {sorted(unknown)} are not in the {suite} suite: {sorted({c.model for c in cases})}")
        cases = tuple(c for c in cases if c.model in wanted)
    compile_mode = args.compile or ("both" if device.type == "cuda" else "eager")
    modes = {"both": (False, True), "eager": (False,), "compiled": (True,)}[compile_mode]
    dtype = torch.bfloat16 if suite == "gpu" else None
    if args.profile:
        for target in args.profile.split(","):
            model, act = target.split(":")
            case = next((c for c in cases if c.model == model), None)
            if case is None:
                parser.error(f"model {model!r} is not in the {suite} suite: {sorted({c.model for c in cases})}")
            print(profile(case, act, device, dtype), flush=True)
        return []
    rows, skipped, start = [], [], time.perf_counter()
    # eager cases first: the compiled ones take minutes to compile and go last within the budget
    for compiled in modes:
        for case in cases:
            if rows and args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                skipped.append(f"{case.label}, {'compiled' if compiled else 'eager'}")
                continue
            rows += run_case(case, device, dtype, compiled, args.repeats, args.warmup)
            print(markdown(rows[-1 - len(case.acts):], args.repeats, device).split("\n", 3)[-1], flush=True)
            if args.json:  # the rows so far: a run cut short by its time limit keeps its finished cases
                write_json(args.json, rows, skipped, args.repeats, device)
    print(markdown(rows, args.repeats, device))
    if skipped:
        print("skipped (time budget): " + "; ".join(skipped))
    if args.figures:
        text = markdown(rows, args.repeats, device) + ("\n\nskipped (time budget): " + "; ".join(skipped) if skipped else "")
        record_figure(args.figures, command_line("actlab.perf.model_speed", argv), text, device)
    if args.json:
        write_json(args.json, rows, skipped, args.repeats, device)
    return rows


def write_json(path: str, rows: list[Row], skipped: list[str], repeats: int, device: torch.device) -> None:
    """The rows (and the cases skipped for time) as JSON, replacing the file atomically."""
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump({"environment": summary(device), "repeats": repeats, "rows": [asdict(r) for r in rows],
                   "skipped": skipped}, f, indent=1)
    os.replace(partial, path)


if __name__ == "__main__":
    main()
