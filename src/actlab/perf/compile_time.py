"""What the first compiled training step of a converted model costs, against the same model with ReLU.

Each activation runs in a fresh Python process with an empty Inductor cache (nothing is reused between
them): the model is built, wrapped in ``torch.compile``, and two training steps run (forward with targets,
cross-entropy plus DPA's channel loss, backward, SGD step). The first step's time less the second's is
the compile time; Inductor's generated kernels are counted, and the phases it spent the time in are
listed (``torch._dynamo.utils.compile_times``, summed over graphs).

Deterministic counts aside, the times are one run's, on the machine it ran on.

    python -m actlab.perf.compile_time --model resnet26 --acts relu,iieu_b [--batch 2 --image 64] [--json F]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from ..machine import FIGURES_HELP, command_line, record_figure

# Inductor's and Dynamo's phases listed per activation (torch's names; the compilers' phases contain the
# lowering, code generation and kernel building phases)
PHASES = {"tracing": "bytecode_tracing", "autograd trace": "aot_trace_joint_graph",
          "forward compile": "compile_fx.<locals>.fw_compiler_base", "backward compile": "compile_fx.<locals>.bw_compiler",
          "lowering": "GraphLowering.run", "fusion": "Scheduler.__init__", "codegen": "GraphLowering.codegen",
          "kernel builds": "async_compile.wait"}


def _step(model, optimizer, x, y) -> float:
    import actlab

    start = time.perf_counter()
    with actlab.targets(model, y):
        logits = model(x)
    loss = F.cross_entropy(logits, y) + actlab.dpa_loss(model)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def _phases() -> list[tuple[str, float]]:
    """Seconds in each of ``PHASES`` (summed over the graphs)."""
    names, values = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    totals = dict(zip(names, (float(v) for v in values)))
    return [(label, totals.get(key, 0.0)) for label, key in PHASES.items()]


def measure(model_name: str, act: str, batch: int, image: int, classes: int) -> dict:
    """In this process: the first and second compiled training steps of one activation."""
    from torch._inductor import metrics

    from ..models import create_model

    torch.manual_seed(0)
    model = create_model(model_name, act, classes, image_size=image)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    compiled = torch.compile(model)
    x = torch.randn(batch, 3, image, image)
    y = torch.randint(0, classes, (batch,))
    metrics.reset()
    first = _step(compiled, optimizer, x, y)
    kernels = metrics.generated_kernel_count
    second = _step(compiled, optimizer, x, y)
    return {"act": act, "first_s": first, "steady_s": second, "compile_s": first - second, "kernels": kernels,
            "phases": _phases()}


def measure_fresh(model_name: str, act: str, batch: int, image: int, classes: int) -> dict:
    """``measure`` in a new Python process with an empty Inductor cache of its own."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
        code = ("import json, sys; from actlab.perf.compile_time import measure; "
                f"print(json.dumps(measure({model_name!r}, {act!r}, {batch}, {image}, {classes})))")
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"compiling {model_name} + {act} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(model_name: str, rows: list[dict]) -> str:
    relu = next((r for r in rows if r["act"] == "relu"), None)
    lines = ["| model | activation | first step s | steady step s | compile s | x ReLU compile | kernels generated | "
             "phases (s) |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ratio = r["compile_s"] / relu["compile_s"] if relu else float("nan")
        phases = ", ".join(f"{name} {seconds:.1f}" for name, seconds in r["phases"])
        lines.append(f"| {model_name} | {r['act']} | {r['first_s']:.1f} | {r['steady_s']:.2f} | {r['compile_s']:.1f} | "
                     f"{ratio:.2f} | {r['kernels']} | {phases} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m actlab.perf.compile_time``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet26")
    parser.add_argument("--acts", default="relu,iieu_b", help="comma-separated; relu first for the ratio")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    parser.add_argument("--figures", metavar="FOLDER", help=FIGURES_HELP)
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    rows = []
    for act in args.acts.split(","):
        rows.append(measure_fresh(args.model, act.strip(), args.batch, args.image, args.classes))
        print(table(args.model, rows).splitlines()[-1], flush=True)  # its row, against ReLU's when measured
    print(table(args.model, rows))
    if args.figures:
        record_figure(args.figures, command_line("actlab.perf.compile_time", argv), table(args.model, rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "batch": args.batch, "image": args.image, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
