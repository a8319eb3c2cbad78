"""The machine and software a figure or a run came from, described in one place: run summaries, the bench
grid's rows and every performance table state it, and each machine's figures live in one file that the
measuring tools write (``record_figure``)."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shlex
import sys
import time

import torch


def describe() -> dict:
    """torch and Python versions, the CPU architecture, torch's thread count, and the CUDA device's name
    (None without one)."""
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def summary(device: torch.device | str = "cpu") -> str:
    """One line for a table's header: the device that ran it (a CUDA device's name, memory and driver, or the
    CPU and torch's thread count), torch (with its CUDA and Triton on a GPU) and Python."""
    device = torch.device(device)
    if device.type != "cuda":
        where = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
        return f"{where}; torch {torch.__version__}; Python {platform.python_version()}"
    memory = torch.cuda.get_device_properties(device).total_memory / 1e9
    return (f"{torch.cuda.get_device_name(device)} ({memory:.0f} GB), driver {cuda_driver()}; torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}); Triton {_version('triton')}; Python {platform.python_version()}")


def cuda_driver(proc: str = "/proc/driver/nvidia/version") -> str:
    """The NVIDIA driver's version, as the kernel module reports it in ``proc`` ("unknown" where it is not
    readable: another platform, or a container that hides it)."""
    try:
        with open(proc) as f:
            found = re.search(r"Kernel Module(?: for [\w]+)?\s+([\d.]+)", f.read())
    except OSError:
        return "unknown"
    return found.group(1) if found else "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def figures_name(device: torch.device | str = "cpu") -> str:
    """The file name of this machine's figures: from a CUDA device's name (``nvidia-h200.md``), or from
    the CPU's architecture and torch's thread count (``cpu-x86_64-2-threads.md``)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu {platform.machine()} {torch.get_num_threads()} threads"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ".md"


def record_figure(folder: str, command: str, table: str, device: torch.device | str = "cpu") -> str:
    """Write ``table`` (the markdown a tool printed) into this machine's figures file in ``folder`` as the
    section of ``command``, with the date, and the machine and versions unless the table states them; a section of the same command is replaced,
    the others are kept (sorted by command). Returns the file's path.

    Args:
        folder: where the per-machine files live (the docs keep theirs in ``docs/figures``).
        command: the command line that measured it, as a user would type it.
        table: what the tool printed: its table and the lines that say how it measured.
        device: the device it ran on, which names the file.
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, figures_name(device))
    sections = _figure_sections(path)
    machine = summary(device)
    stamp = time.strftime("%Y-%m-%d") + ("" if machine in table else f"; {machine}")  # said once
    sections[command] = f"## `{command}`\n\n{stamp}.\n\n{table.strip()}\n"
    title = os.path.splitext(os.path.basename(path))[0]
    parts = [f"# Figures: {title}\n\n{_FIGURES_HEAD}\n"]
    parts += [f"{_BEGIN}{cmd} -->\n{body}{_END}\n" for cmd, body in sorted(sections.items())]
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


_FIGURES_HEAD = ("Every table here was written by the tool that measured it, run with `--figures` on this machine; "
                 "running the same command again replaces its section.")
_BEGIN, _END = "<!-- figure: ", "<!-- end figure -->\n"


def _figure_sections(path: str) -> dict[str, str]:
    """{command: section body} of a figures file (empty when there is none yet)."""
    if not os.path.isfile(path):
        return {}
    text = open(path).read()
    found = re.findall(re.escape(_BEGIN) + r"(.*?) -->\n(.*?)" + re.escape(_END), text, flags=re.S)
    return dict(found)


def command_line(module: str, argv: list[str] | None) -> str:
    """``python -m MODULE ARGS`` as the user ran it (``argv`` None: this process's arguments), without the
    ``--figures`` option that only says where the figures go."""
    args = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--figures":
            skip = True
        elif not a.startswith("--figures="):
            kept.append(a)
    return " ".join(["python", "-m", module, *map(shlex.quote, kept)])


FIGURES_HELP = ("also write the table into this folder's file for this machine (docs/figures for the docs), "
                "replacing this command's earlier table there")
