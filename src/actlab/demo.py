"""A one-minute tour, offline: convert a torchvision ResNet-18 to IIEU-B and to DPA, train a few steps on
a generated batch, and show what was converted and what the DPA memories hold.

    python -m actlab.demo
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
import torchvision

import actlab

NUM_CLASSES = 10


def train_steps(model: torch.nn.Module, steps: int, lam: float) -> list[tuple[float, float]]:
    """SGD on one fixed generated batch (32x32 images, 10 classes); returns (task loss, channel loss)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=g)
    y = torch.randint(0, NUM_CLASSES, (16,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    history = []
    model.train()
    for _ in range(steps):
        with actlab.targets(model, y):
            logits = model(x)
        task, channel = F.cross_entropy(logits, y), actlab.dpa_loss(model)
        opt.zero_grad()
        (task + lam * channel).backward()
        opt.step()
        history.append((task.item(), channel.item()))
    return history


def main() -> None:
    # Training uses IIEU-B's fused (compiled) kernels by default; compiling them takes up to a minute on a
    # small CPU the first time, which a one-minute tour should not spend.
    actlab.activations.kernels.set_kernels("eager")
    torch.manual_seed(0)
    example = torch.randn(2, 3, 32, 32)
    for name in ("relu", "iieu_b", "dpa"):
        model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
        if name != "relu":
            actlab.convert(model, name, num_classes=NUM_CLASSES, example_input=example)
            report = actlab.conversion_report(model)
            print(f"\n== {name}: {len(report.converted)} sites converted, {len(report.kept)} kept ==")
            print("\n".join(str(report).splitlines()[1:6]) + "\n  ...")
        else:
            print("\n== relu (torchvision's model as it comes) ==")
        start = time.perf_counter()
        history = train_steps(model, steps=10, lam=1.0)
        secs = time.perf_counter() - start
        first, last = history[0], history[-1]
        print(f"  10 steps in {secs:.1f}s: task loss {first[0]:.3f} -> {last[0]:.3f}, "
              f"channel loss {first[1]:.4f} -> {last[1]:.4f}")
        if name == "dpa":
            site = model.layer4[1].relu.sites[1]
            flagged = ((site.value_memory < 0) & (site.grad_memory < 0)).float().mean().item()
            print(f"  layer4.1 last site: memories {tuple(site.value_memory.shape)} in the state_dict, "
                  f"{flagged:.0%} of (class, channel) pairs flagged irrelevant")
    print("\nNext: `make test`, and docs/api.md for the API.")


if __name__ == "__main__":
    main()
