"""DataLoaders whose order depends only on (seed, epoch): resumable and identical across runs."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochShuffle(Sampler[int]):
    """Training order: a fresh permutation per epoch drawn from ``seed + epoch`` (call ``set_epoch`` like
    DistributedSampler), cut into global batches of ``batch_size * world``, of which rank r takes the
    r-th contiguous slice. Gathering the ranks' batches rank-major gives exactly the batch one process
    would see (DPA's sequential memory update depends on that order). Incomplete last global batches
    are dropped."""

    def __init__(self, dataset: Dataset, seed: int, batch_size: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world, self.batch_size, self.epoch = len(dataset), seed, rank, world, batch_size, 0
        self.steps = self.n // (batch_size * world)
        if self.steps == 0:
            raise ValueError(f"batch size {batch_size} x {world} process(es) is larger than the training set "
                             f"({self.n} samples)")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.steps * self.batch_size * self.world]
        return iter(perm.view(self.steps, self.world, self.batch_size)[:, self.rank].reshape(-1).tolist())

    def __len__(self) -> int:
        return self.steps * self.batch_size


class Shard(Sampler[int]):
    """Evaluation share of one rank: every ``world``-th sample, no padding (so no sample counts twice)."""

    def __init__(self, dataset: Dataset, rank: int, world: int):
        self.indices = list(range(rank, len(dataset), world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loaders(train: Dataset, test: Dataset, batch_size: int, *, workers: int = 0, seed: int = 0,
                 rank: int = 0, world: int = 1, eval_batch_size: int | None = None):
    """Training loader (a fresh seeded order per epoch, ``set_epoch`` on its sampler; incomplete last
    batch dropped so BatchNorm and step counts stay stable) and test loader.

    Args:
        batch_size: per-process batch. Under DDP the global batch is ``batch_size * world``, and the
            ranks together see exactly the batches of one process with that batch size.
        rank, world: this process's rank and the number of processes (1: no DDP).
        eval_batch_size: test batch (default ``batch_size``); the test set is sharded without padding.
    """
    train_sampler = EpochShuffle(train, seed, batch_size, rank, world)
    test_sampler = Shard(test, rank, world) if world > 1 else None
    common = {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": torch.cuda.is_available()}
    train_loader = DataLoader(train, batch_size, sampler=train_sampler, drop_last=True, **common)
    test_loader = DataLoader(test, eval_batch_size or batch_size, sampler=test_sampler, shuffle=False, **common)
    return train_loader, test_loader
