"""The compile-time benchmark's table: compile time against ReLU's, the phases Inductor spent it in."""
from __future__ import annotations

from actlab.perf import compile_time


def row(act: str, first: float, steady: float, kernels: int) -> dict:
    phases = [(label, first / 10) for label in compile_time.PHASES]
    return {"act": act, "first_s": first, "steady_s": steady, "compile_s": first - steady, "kernels": kernels,
            "phases": phases}


def test_table_states_compile_time_against_relu_and_the_phases():
    text = compile_time.table("resnet26", [row("relu", 100.5, 0.5, 300), row("iieu_b", 250.5, 0.5, 900)])
    lines = text.splitlines()
    assert lines[2].startswith("| resnet26 | relu | 100.5 | 0.50 | 100.0 | 1.00 | 300 |")
    assert lines[3].startswith("| resnet26 | iieu_b | 250.5 | 0.50 | 250.0 | 2.50 | 900 |")
    assert "kernel builds 25.1" in lines[3] and "tracing 25.1" in lines[3]


def test_every_phase_is_one_torch_reports():
    """The phase names are those torch's compile timers use (a renamed timer would read 0 silently)."""
    import torch

    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):  # a cached graph skips the compile phases
        model = torch.compile(torch.nn.Linear(3, 2))
        model(torch.randn(2, 3)).sum().backward()
    names, _ = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    assert set(compile_time.PHASES.values()) <= set(names)
