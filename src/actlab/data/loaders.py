"""DataLoaders whose order depends only on (seed, epoch): resumable and identical across runs."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


class EpochShuffle(Sampler[int]):
    """A fresh permutation per epoch drawn from ``seed + epoch`` (call ``set_epoch`` like DistributedSampler)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.n, self.seed, self.epoch = len(dataset), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def make_loaders(train: Dataset, test: Dataset, batch_size: int, *, workers: int = 0, seed: int = 0,
                 distributed: bool = False, drop_last: bool = True, eval_batch_size: int | None = None):
    """Training loader (shuffled per epoch; under DDP each rank gets its DistributedSampler share of
    ``batch_size`` per step... see Args) and test loader.

    Args:
        batch_size: per-process batch. Under DDP the global batch is ``batch_size * world_size``.
        distributed: use DistributedSampler (seeded, padded to equal shares) for train and test.
        drop_last: drop the last incomplete training batch (keeps BatchNorm and step counts stable).
    """
    if distributed:
        train_sampler = DistributedSampler(train, shuffle=True, seed=seed, drop_last=drop_last)
        test_sampler = DistributedSampler(test, shuffle=False)
    else:
        train_sampler, test_sampler = EpochShuffle(train, seed), None
    if len(train) < batch_size and drop_last:
        raise ValueError(f"batch size {batch_size} is larger than the training set ({len(train)} samples)")
    common = {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": torch.cuda.is_available()}
    train_loader = DataLoader(train, batch_size, sampler=train_sampler, drop_last=drop_last, **common)
    test_loader = DataLoader(test, eval_batch_size or batch_size, sampler=test_sampler, shuffle=False, **common)
    return train_loader, test_loader
