"""Whole-model training steps of IIEU-B, IIEU-DC and DPA side by side with ReLU.

Each case is one architecture at one batch and input size, built once per activation; the steps
(forward with targets, loss with DPA's channel loss, backward, SGD step) run interleaved round-robin, and
"x ReLU time" is the median over rounds of each round's ratio to ReLU's step in the same round. Memory is
the peak allocated during a step (``torch.cuda.max_memory_allocated`` above what the model and optimizer
already hold) on CUDA, and the bytes saved for backward on the CPU.

Suites:
  gpu: IIEU paper ResNet-26 and ResNet-50 (its placement) at batch 128, 224x224; ViT-Tiny/4 at 32x32,
       batch 256; bf16 autocast; eager, torch.compile, and torch.compile with CUDA graphs
       (``mode="reduce-overhead"``).
  cpu: IIEU paper ResNet-26 training steps at batch 16, 64x64 and batch 8, 224x224, float32, eager.

Beside each bf16 eager row of the gpu suite stand the GPU cost model's counts for that step (extra
kernels and host calls per site beyond ReLU's; DPA also over an interval), read from ``gpu_counts.json``
next to this file, which ``python -m actlab.perf.gpu_cost --suite gpu --json ...`` writes. On CUDA a
second table sets each counted row's time beside the cost model's prediction: its bytes at the card's
copy bandwidth (measured at the start, or ``--bandwidth``) plus its host calls at one per-call cost fitted
on ReLU's steps of the run (``actlab.perf.prediction``).

    python -m actlab.perf.model_speed --suite gpu [--repeats 20] [--compile eager,compiled,cudagraphs] [--json F]
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
from .prediction import DISAGREEMENT, CostModel, disagrees, fit
from .timing import copy_bandwidth, saved_bytes, time_interleaved

NUM_CLASSES = 1000
DPA_INTERVAL = 5  # DPA's default: one update step in every five training steps
COUNTS = Path(__file__).with_name("gpu_counts.json")  # the cost model's counts of the gpu suite's eager steps
# how a step runs: torch.compile's mode (None: eager) and the table's name for it
MODES = {"eager": (None, "eager"), "compiled": ("default", "compiled"),
         "cudagraphs": ("reduce-overhead", "compiled, CUDA graphs")}
MODE_SETS = {"both": ("eager", "compiled"), "all": ("eager", "compiled", "cudagraphs")}  # names for lists of modes


def parse_modes(text: str) -> tuple[str, ...]:
    """``--compile``'s value: a comma-separated list of modes (keys of MODES), or one of MODE_SETS' names."""
    if text in MODE_SETS:
        return MODE_SETS[text]
    modes = tuple(m.strip() for m in text.split(","))
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {unknown}: give a comma-separated list of "
                                         f"{', '.join(MODES)}, or one of {', '.join(MODE_SETS)}")
    return modes


@dataclass(frozen=True)
class Target:
    """The most an activation's step may cost against ReLU's in the same run: time (the median of the
    per-round ratios; DPA's the mean over whole intervals, its update steps included) and, where set, memory."""

    time: float
    memory: float | None = None

    def verdict(self, row: "Row") -> str:
        """'<= 1.25x time, <= 1.10x memory: met', or what was missed."""
        time = row.mean_vs_relu if row.activation == "dpa" else row.time_vs_relu
        wanted = f"<= {self.time:.2f}x time" + (f", <= {self.memory:.2f}x memory" if self.memory else "")
        missed = [f"time {time:.2f}x"] if time > self.time else []
        if self.memory and row.memory_vs_relu > self.memory:
            missed.append(f"memory {row.memory_vs_relu:.2f}x")
        return f"{wanted}: " + ("missed (" + ", ".join(missed) + ")" if missed else "met")


@dataclass(frozen=True)
class Case:
    """One architecture at one size; ``acts`` are compared against ReLU."""

    model: str
    batch: int
    image_size: int
    acts: tuple[str, ...]
    num_classes: int = NUM_CLASSES
    targets: tuple[tuple[str, Target], ...] = ()  # (activation, its target against ReLU)

    @property
    def label(self) -> str:
        return f"{self.model}, batch {self.batch}, {self.image_size}x{self.image_size}"


SUITES = {
    "gpu": (Case("resnet26", 128, 224, ("iieu_b", "iieu_dc"),
                 targets=(("iieu_b", Target(1.25, 1.10)), ("iieu_dc", Target(1.35)))),
            Case("resnet50", 128, 224, ("iieu_b", "iieu_dc", "dpa"),
                 targets=(("iieu_b", Target(1.25, 1.10)), ("iieu_dc", Target(1.35)), ("dpa", Target(1.05)))),
            Case("vit_tiny", 256, 32, ("iieu_b", "dpa"), num_classes=100,
                 targets=(("iieu_b", Target(1.25)), ("dpa", Target(1.05, 1.05))))),
    "cpu": tuple(Case("resnet26", batch, size, ("iieu_b", "iieu_dc"),
                      targets=(("iieu_b", Target(1.2)), ("iieu_dc", Target(1.3, 1.15))))
                 for batch, size in ((16, 64), (8, 224))),
}


@dataclass
class Row:
    case: str
    activation: str
    mode: str                              # a key of MODES
    precision: str
    ms_median: float
    ms_iqr: float
    memory_mb: float
    time_vs_relu: float = float("nan")
    memory_vs_relu: float = float("nan")
    ms_mean: float = float("nan")          # over whole DPA intervals of rounds (update steps included)
    mean_vs_relu: float = float("nan")     # that mean against ReLU's over the same rounds
    counted: dict | None = None            # the cost model's counts of this step (bf16 eager), if any
    predicted_ms: float = float("nan")     # the cost model's time of an ordinary step (beside ms_median)
    predicted_mean_ms: float = float("nan")  # ... of a step's mean over a DPA interval (beside ms_mean)
    predicted_extra_ms: float = float("nan")  # ... of what its ordinary step adds to ReLU's in the same case
    graphs_skipped: int = 0                # compiled graphs that Inductor ran without CUDA graphs (cudagraphs mode)
    target: str = "-"                      # the case's target for this activation, and whether it was met
    first_step_s: float = float("nan")     # the first (warm-up) step, compilation and kernel builds included

    def counted_cell(self) -> str:
        """'kernels / host calls' per site beyond ReLU's, ordinary steps (and DPA's interval mean)."""
        if not self.counted or "kernels_per_site" not in self.counted["ordinary"]:
            return "-"
        cells = [f"{e['kernels_per_site']:.1f} / {e['host_calls_per_site']:.1f}" for e in self.counted.values()]
        return cells[0] + (f" (interval {cells[1]})" if len(cells) > 1 else "")


def count_key(case: "Case", act: str) -> str:
    """How the counts table names one activation of one case."""
    return f"{case.model}/{act}/{case.batch}/{case.image_size}/{case.num_classes}"


@cache
def _counts() -> dict:
    return json.loads(COUNTS.read_text()) if COUNTS.exists() else {}


def counted(case: "Case", act: str, dtype: torch.dtype | None, mode: str) -> dict | None:
    """The cost model's counts of this step: bf16 eager steps of the counted cases only."""
    if mode != "eager" or dtype != torch.bfloat16:
        return None
    return _counts().get(count_key(case, act))


class TrainingStep:
    """One model's training step on fixed random data (what the timing loop calls)."""

    def __init__(self, case: Case, act: str, device: torch.device, dtype: torch.dtype | None, mode: str):
        torch.manual_seed(0)
        self.model = create_model(case.model, act, case.num_classes, image_size=case.image_size).to(device)
        self.x = torch.randn(case.batch, 3, case.image_size, case.image_size, device=device)
        self.y = torch.randint(0, case.num_classes, (case.batch,), device=device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)
        compile_mode = MODES[mode][0]
        self.forward = self.model if compile_mode is None else torch.compile(self.model, mode=compile_mode)
        # CUDA graph trees: each step begins a new replay, so the previous step's outputs may be overwritten
        self.graphs = compile_mode == "reduce-overhead"
        self.graphs_skipped = 0  # graphs of this model Inductor ran without CUDA graphs (it says why in its log)
        self.device, self.dtype = device, dtype

    def loss(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            with actlab.targets(self.model, self.y, validate=False):
                logits = self.forward(self.x)
            return F.cross_entropy(logits.float(), self.y) + actlab.dpa_loss(self.model)

    def __call__(self) -> None:
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
            skipped = _graphs_skipped()
        loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.graphs:
            self.graphs_skipped += _graphs_skipped() - skipped

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


def _graphs_skipped() -> int:
    """How many compiled graphs Inductor has run without CUDA graphs in this process (torch's counter)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def run_case(case: Case, device: torch.device, dtype: torch.dtype | None, mode: str, repeats: int,
             warmup: int) -> list[Row]:
    acts = ("relu", *case.acts)
    steps = {act: TrainingStep(case, act, device, dtype, mode) for act in acts}
    first: dict[str, float] = {}
    times = time_interleaved(steps, repeats, warmup, device, first)
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    rows = []
    for act in acts:
        q = statistics.quantiles(times[act], n=4)
        rows.append(Row(case.label, act, mode, precision, statistics.median(times[act]), q[2] - q[0],
                        steps[act].memory_mb(), counted=counted(case, act, dtype, mode),
                        graphs_skipped=steps[act].graphs_skipped, first_step_s=first.get(act, float("nan"))))
    relu = rows[0]
    whole = DPA_INTERVAL * (repeats // DPA_INTERVAL) or repeats  # rounds that hold whole DPA intervals
    for row in rows:
        row.time_vs_relu = statistics.median(t / r for t, r in zip(times[row.activation], times["relu"]))
        row.memory_vs_relu = row.memory_mb / relu.memory_mb if relu.memory_mb else float("nan")
        row.ms_mean = statistics.fmean(times[row.activation][:whole])
        row.mean_vs_relu = row.ms_mean / statistics.fmean(times["relu"][:whole])
        target = dict(case.targets).get(row.activation)
        row.target = target.verdict(row) if target else "-"
    del steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[Row], repeats: int, device: torch.device) -> str:
    memory = "peak MB" if device.type == "cuda" else "saved MB"
    lines = [f"Machine: {summary(device)}; median of {repeats} interleaved training steps (IQR in brackets); "
             "x ReLU: median of the per-round ratios; mean: over whole DPA intervals of rounds (its update steps "
             "included), against ReLU's mean over the same rounds; counted: the GPU cost model's extra kernels / host "
             "calls per site beyond ReLU's step (bf16 eager); target: against ReLU (DPA's time: its mean).", "",
             f"| case | activation | mode | ms | x ReLU time | mean ms (x ReLU) | {memory} | x ReLU memory | counted | "
             "target |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mode = f"{r.precision}, {MODES[r.mode][1]}"
        if r.graphs_skipped:
            mode += f" ({r.graphs_skipped} graph{'' if r.graphs_skipped == 1 else 's'} without them)"
        if r.mode != "eager":
            mode += f"; first step {r.first_step_s:.0f} s"
        lines.append(f"| {r.case} | {r.activation} | {mode} | {r.ms_median:.1f} [{r.ms_iqr:.1f}] | {r.time_vs_relu:.2f} | "
                     f"{r.ms_mean:.1f} ({r.mean_vs_relu:.2f}) | {r.memory_mb:.0f} | {r.memory_vs_relu:.2f} | "
                     f"{r.counted_cell()} | {r.target} |")
    return "\n".join(lines)


def predict(rows: list[Row], bandwidth: float) -> CostModel | None:
    """Set each counted row's predicted times: bytes at ``bandwidth`` plus host calls at one per-call cost,
    fitted on what the activations' steps add to ReLU's in the same case (their extra bytes and host calls
    against their extra time), the quantity the cost model counts per site. None (nothing set) without a
    counted activation row beside a counted ReLU row."""
    counted_rows = [r for r in rows if r.counted and "bytes" in r.counted["ordinary"]]
    relu = {r.case: r for r in counted_rows if r.activation == "relu"}
    extras = [(_extra(r, relu[r.case]), r.ms_median - relu[r.case].ms_median)
              for r in counted_rows if r.activation != "relu" and r.case in relu]
    if not extras:
        return None
    model = fit(extras, bandwidth)
    for r in counted_rows:
        r.predicted_ms = model.predict_ms(r.counted["ordinary"])
        r.predicted_mean_ms = model.predict_ms(r.counted.get("interval", r.counted["ordinary"]))
        if r.activation != "relu" and r.case in relu:
            r.predicted_extra_ms = model.predict_ms(_extra(r, relu[r.case]))
    return model


def _extra(row: Row, relu: Row) -> dict:
    """What a row's ordinary step counts beyond ReLU's."""
    mine, base = row.counted["ordinary"], relu.counted["ordinary"]
    return {k: mine[k] - base[k] for k in ("bytes", "host_calls")}


def prediction_markdown(rows: list[Row], model: CostModel, bandwidth_source: str) -> str:
    """The counted rows' measured times beside the cost model's predictions."""
    relu = {r.case: r for r in rows if r.activation == "relu"}
    off = f" (off by more than {DISAGREEMENT * 100:.0f} %)"
    lines = [f"Cost model: a step's counted bytes at {model.bandwidth / 1e12:.2f} TB/s ({bandwidth_source}) plus its "
             f"counted host calls at {model.host_us:.2f} us each (one cost, fitted by least squares on the "
             "activations' extra time over ReLU's in the same case against their extra bytes and host calls); "
             f"flagged where a measurement is more than {DISAGREEMENT * 100:.0f} % from its prediction.", "",
             "| case | activation | counted GB, host calls | predicted ms (bytes + host) | measured ms | "
             "measured / predicted | extra over ReLU: predicted / measured ms | interval mean: predicted / measured ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.predicted_ms != r.predicted_ms:
            continue
        c = r.counted["ordinary"]
        device = model.device_ms(c)
        step = f"{r.ms_median / r.predicted_ms:.2f}" + (off if disagrees(r.ms_median, r.predicted_ms) else "")
        extra = "-"
        if r.activation != "relu" and r.case in relu:
            measured = r.ms_median - relu[r.case].ms_median
            extra = f"{r.predicted_extra_ms:.1f} / {measured:.1f}" + (off if disagrees(measured, r.predicted_extra_ms) else "")
        interval = "-"
        if "interval" in r.counted:
            interval = f"{r.predicted_mean_ms:.1f} / {r.ms_mean:.1f}" + (off if disagrees(r.ms_mean, r.predicted_mean_ms) else "")
        lines.append(f"| {r.case} | {r.activation} | {c['bytes'] / 1e9:.2f}, {c['host_calls']:.0f} | "
                     f"{r.predicted_ms:.1f} ({device:.1f} + {r.predicted_ms - device:.1f}) | {r.ms_median:.1f} | "
                     f"{step} | {extra} | {interval} |")
    return "\n".join(lines)


def profile(case: Case, act: str, device: torch.device, dtype: torch.dtype | None, steps: int = 3,
            rows: int = 25) -> str:
    """The PyTorch profiler's kernel table for a few eager training steps of one activation (after two warm-ups)."""
    step = TrainingStep(case, act, device, dtype, "eager")
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
    parser.add_argument("--models", default=None, help="comma-separated subset of the suite's models, run in this order")
    parser.add_argument("--compile", type=parse_modes, default=None, metavar="MODES",
                        help="how the steps run, a comma-separated list of: eager, compiled (torch.compile), "
                             "cudagraphs (torch.compile with CUDA graphs); or both (eager,compiled) or all (the "
                             "three); default: all on CUDA, eager on the CPU")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new case after this many seconds (the first always runs; the rest are listed as skipped)")
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="bytes/s for the cost model's predictions (default on CUDA: a device-to-device copy "
                             "measured at the start; without CUDA or this, no predictions)")
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
        wanted = [m.strip() for m in args.models.split(",")]
        unknown = set(wanted) - {c.model for c in cases}
        if unknown:
            parser.error(f"models {sorted(unknown)} are not in the {suite} suite: {sorted({c.model for c in cases})}")
        cases = tuple(c for m in wanted for c in cases if c.model == m)  # in the order given
    modes = args.compile or (MODE_SETS["all"] if device.type == "cuda" else ("eager",))
    dtype = torch.bfloat16 if suite == "gpu" else None
    if args.profile:
        targets = [t.split(":") for t in args.profile.split(",")]
        for target in targets:
            if len(target) != 2 or target[0] not in {c.model for c in cases}:
                parser.error(f"--profile takes MODEL:ACT pairs with a model of the {suite} suite "
                             f"({sorted({c.model for c in cases})}), got {':'.join(target)!r}")
            actlab.activations.get_spec(target[1])  # an unknown activation fails before any work
        for model, act in targets:
            case = next(c for c in cases if c.model == model)
            print(profile(case, act, device, dtype), flush=True)
        return []
    bandwidth, source = args.bandwidth, "given"
    if bandwidth is None and device.type == "cuda":
        bandwidth, source = copy_bandwidth(device), "a device-to-device copy measured in this run"
    rows, skipped = time_suite(cases, modes, device, dtype, Timing(args.repeats, args.warmup, args.budget_s),
                               args.json)
    model = predict(rows, bandwidth) if bandwidth else None
    text = markdown(rows, args.repeats, device)
    if model:
        text += "\n\n" + prediction_markdown(rows, model, source)
    if skipped:
        text += "\n\nskipped (time budget): " + "; ".join(skipped)
    print(text)
    if args.figures:
        record_figure(args.figures, command_line("actlab.perf.model_speed", argv), text, device)
    if args.json:
        write_json(args.json, rows, skipped, args.repeats, device)
    return rows


@dataclass(frozen=True)
class Timing:
    """How the suite is timed: rounds timed, untimed rounds first, and the seconds after which no new case
    starts (None: no limit; the first case always runs)."""

    repeats: int
    warmup: int
    budget_s: float | None = None


def time_suite(cases: tuple[Case, ...], modes: tuple[str, ...], device: torch.device, dtype: torch.dtype | None,
               timing: Timing, json_path: str | None = None) -> tuple[list[Row], list[str]]:
    """Every case in every mode: eager first, for every case; then case by case its compiled modes (one after
    the other, so that the second finds the first's kernels in the compilers' caches), within the timing's
    budget. Each case's rows are printed and written to ``json_path`` as soon as it is done. Returns the
    rows and the cases skipped for time."""
    rows, skipped, start = [], [], time.perf_counter()
    order = [("eager", case) for case in cases if "eager" in modes]
    order += [(mode, case) for case in cases for mode in modes if mode != "eager"]
    for mode, case in order:
        if rows and timing.budget_s is not None and time.perf_counter() - start > timing.budget_s:
            skipped.append(f"{case.label}, {MODES[mode][1]}")
            continue
        rows += run_case(case, device, dtype, mode, timing.repeats, timing.warmup)
        print(markdown(rows[-1 - len(case.acts):], timing.repeats, device).split("\n", 3)[-1], flush=True)
        if json_path:  # the rows so far: a run cut short by its time limit keeps its finished cases
            write_json(json_path, rows, skipped, timing.repeats, device)
    return rows, skipped


def write_json(path: str, rows: list[Row], skipped: list[str], repeats: int, device: torch.device) -> None:
    """The rows (and the cases skipped for time) as JSON, replacing the file atomically."""
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump({"environment": summary(device), "repeats": repeats, "rows": [asdict(r) for r in rows],
                   "skipped": skipped}, f, indent=1)
    os.replace(partial, path)


if __name__ == "__main__":
    main()
