"""Timing and memory measurements shared by the performance tools."""
from __future__ import annotations

import time

import torch


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages that autograd keeps for backward while ``fn()`` runs."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(steps: dict, repeats: int, warmup: int, device: torch.device, first: dict | None = None) -> dict:
    """ms per call of each step, the steps called round-robin ``repeats`` times after ``warmup`` rounds,
    so that every step sees the same machine state. ``first``, when given, receives each step's first call
    in seconds (compilation included), from the first warm-up round."""
    for round_ in range(warmup):
        for key, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            if round_ == 0 and first is not None:
                first[key] = time.perf_counter() - t0
    times = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times[key].append(1000 * (time.perf_counter() - t0))
    return times




def copy_bandwidth(device: torch.device, nbytes: int = 2**30, repeats: int = 10) -> float:
    """Bytes per second a device-to-device copy of ``nbytes`` moves on a CUDA device, counting the bytes
    read and the bytes written (the mean of ``repeats`` copies after two warm-ups, timed by CUDA events)."""
    if device.type != "cuda":
        raise ValueError(f"copy_bandwidth measures a CUDA device's memory, got device {device}")
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * nbytes * repeats / (start.elapsed_time(end) / 1e3)
