"""Shared DPA fixtures: a tiny model and data, and the worker of the two-process gloo test."""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import actlab

NUM_CLASSES = 3
CHANNELS = 8


def tiny_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, CHANNELS), nn.ReLU(), nn.Linear(CHANNELS, NUM_CLASSES))
    return actlab.convert(model, "dpa", num_classes=NUM_CLASSES, example_input=torch.randn(2, 6), strict=True)


def batches(steps: int, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        # few classes and a biased input so classes repeat and some class means go negative
        yield torch.randn(batch, 6, generator=g) - 0.3, torch.randint(0, NUM_CLASSES, (batch,), generator=g)


def train_steps(model: nn.Module, data, lam: float = 1.0, rank: int = 0, world: int = 1,
                capacity: int | None = None) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in data:
        if world > 1:  # this rank's contiguous slice of the global batch (rank-major)
            per = x.shape[0] // world
            x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        with actlab.targets(model, y, capacity=capacity):
            logits = model(x)
        loss = F.cross_entropy(logits, y) + lam * actlab.dpa_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def gloo_worker(rank: int, world: int, init_file: str, out_dir: str, steps: int, batch: int,
                capacity: int | None = None) -> None:
    """Train the tiny model on this rank's share of each batch; save its state. With ``capacity`` the
    CUDA code path runs (emulated on CPU tensors) and every step is counted: the host reads are saved."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        if capacity is None:
            train_steps(ddp, batches(steps, batch), rank=rank, world=world)
        else:
            from actlab.activations import kernels
            from actlab.perf.gpu_cost import CostCounter

            kernels.set_emulate_cuda(True)
            with CostCounter() as counter:
                train_steps(ddp, batches(steps, batch), rank=rank, world=world, capacity=capacity)
            torch.save([c.where for c in counter.calls if c.sync], os.path.join(out_dir, f"syncs{rank}.pt"))
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
