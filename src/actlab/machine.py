"""The machine and software a figure or a run came from, described in one place: run summaries, the bench
grid's rows and every performance table state it."""
from __future__ import annotations

import platform

import torch


def describe() -> dict:
    """torch and Python versions, the CPU architecture, torch's thread count, and the CUDA device's name
    (None without one)."""
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def summary(device: torch.device | str = "cpu") -> str:
    """One line for a table's header: the device that ran it (a CUDA device's name, or the CPU and torch's
    thread count), torch and Python."""
    device = torch.device(device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    return f"{where}; torch {torch.__version__}; Python {platform.python_version()}"
