"""What an epoch measures: top-1 / top-5 hits, running sums kept on the device, the non-finite-loss
watch, and the evaluation pass."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import DistInfo, all_sum
from .precision import Precision


def accuracy_counts(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Top-1 and top-5 hits in the batch, as a (2,) tensor on the logits' device (no host sync)."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hits = top.eq(y[:, None])
    return torch.stack([hits[:, 0].sum(), hits.any(1).sum()])


@dataclass
class Totals:
    """Running sums of an epoch, kept on the device and read only when reported."""

    loss: torch.Tensor
    channel_loss: torch.Tensor
    top1: torch.Tensor
    top5: torch.Tensor
    samples: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> "Totals":
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return cls(zero.clone(), zero.clone(), zero.clone(), zero.clone())

    def add(self, loss: torch.Tensor, channel: torch.Tensor, hits: torch.Tensor, n: int) -> None:
        self.loss += loss.detach() * n
        self.channel_loss += channel.detach() * n
        self.top1 += hits[0]
        self.top5 += hits[1]
        self.samples += n

    def read(self, info: DistInfo, device: torch.device) -> dict:
        """Means over every process's samples (one host sync)."""
        values = torch.stack([self.loss, self.channel_loss, self.top1, self.top5]).tolist() + [self.samples]
        loss, channel, top1, top5, n = all_sum(values, info, device)
        n = max(n, 1)
        return {"loss": loss / n, "channel_loss": channel / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n}


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool):
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, info: DistInfo, precision: Precision | None = None,
             channels_last: bool = False) -> dict:
    """Test loss, top-1 and top-5 (%) over every process's share of the test set."""
    precision = precision or Precision()
    model.eval()
    totals = Totals.zeros(device)
    for x, y in loader:
        x, y = to_device(x, y, device, channels_last)
        with precision.autocast(device):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        totals.add(loss, loss.new_zeros(()), accuracy_counts(logits, y), len(y))
    means = totals.read(info, device)
    return {"loss": means["loss"], "top1": means["top1"], "top5": means["top5"]}


class NonFiniteLoss:
    """Watches the loss on the device; ``check`` (at the log interval) raises for the first bad step."""

    def __init__(self, device: torch.device):
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def watch(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first = torch.where(bad & (self.first < 0), step, self.first)

    def check(self, epoch: int) -> None:
        step = int(self.first)
        if step >= 0:
            raise FloatingPointError(f"the loss became non-finite at step {step} (epoch {epoch}); "
                                     "lower the learning rate or enable grad_clip")
