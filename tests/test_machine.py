"""One description of the machine, and one generated figures file per machine that the measuring tools write."""
from __future__ import annotations

import os

import torch

from actlab import machine
from actlab.perf import speed


def test_a_figure_replaces_its_own_section_and_keeps_the_others(tmp_path):
    folder = str(tmp_path / "figures")
    path = machine.record_figure(folder, "python -m tool --a 1", "| x |\n|---|\n| 1 |")
    machine.record_figure(folder, "python -m other", "| y |\n|---|\n| 2 |")
    assert machine.record_figure(folder, "python -m tool --a 1", "| x |\n|---|\n| 3 |") == path
    assert os.path.basename(path) == machine.figures_name("cpu")
    assert f"{torch.get_num_threads()}-threads" in path
    text = open(path).read()
    assert "| 3 |" in text and "| 1 |" not in text  # replaced
    assert "| 2 |" in text and text.count("## `python -m") == 2  # the other command's section is kept
    assert text.index("python -m other") < text.index("python -m tool")  # sorted by command
    assert machine.summary("cpu") in text and torch.__version__ in text
    stated = machine.record_figure(folder, "python -m third", f"Machine: {machine.summary('cpu')}\n\n| z |")
    assert open(stated).read().count(machine.summary("cpu")) == 3  # a table that states it: not said again


def test_the_command_line_leaves_out_where_the_figures_go():
    assert machine.command_line("actlab.perf.speed", ["--acts", "relu,dpa", "--figures", "docs/figures"]) == \
        "python -m actlab.perf.speed --acts relu,dpa"
    assert machine.command_line("m", ["--figures=x", "--json", "a b.json"]) == "python -m m --json 'a b.json'"


def test_a_benchmark_writes_its_table_into_the_machines_file(tmp_path):
    folder = str(tmp_path)
    rows = speed.main(["--acts", "relu,silu", "--workloads", "mlp", "--repeats", "2", "--warmup", "0",
                       "--figures", folder])
    text = open(os.path.join(folder, machine.figures_name("cpu"))).read()
    assert "## `python -m actlab.perf.speed --acts relu,silu --workloads mlp --repeats 2 --warmup 0`" in text
    silu = next(r for r in rows if r.activation == "silu" and r.mode == "train")
    assert f"| silu | mlp | train step | 1 | {silu.ms_median:.1f}" in text


def test_a_gpu_summary_names_memory_driver_cuda_and_triton(monkeypatch):
    """On CUDA the header line carries what a GPU figure needs (device, memory, driver, torch with its CUDA,
    Triton); here CUDA's answers are stood in for."""
    class Props:
        total_memory = 143_771 * 2**20

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props())
    monkeypatch.setattr(machine, "cuda_driver", lambda: "580.159.04")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    text = machine.summary("cuda")
    assert text.startswith("NVIDIA H200 (151 GB), driver 580.159.04; torch ")
    assert "(CUDA 13.0); Triton " in text and "Python" in text
    assert machine.figures_name("cuda") == "nvidia-h200.md"


def test_the_driver_is_read_from_the_kernel_module(tmp_path):
    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  "
                    "(dvs-builder@U22)  Thu Oct  2 2025\\nGCC version:  gcc version 12.3.0\\n")
    assert machine.cuda_driver(str(proc)) == "580.159.04"
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\\n")
    assert machine.cuda_driver(str(proc)) == "550.54.15"
    assert machine.cuda_driver(str(tmp_path / "absent")) == "unknown"
