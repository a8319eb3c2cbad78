"""DataLoaders whose order depends only on (seed, epoch) and whose augmentation depends only on (seed,
epoch, sample index): resumable, identical across runs, across the number of loader workers and across
DDP's ranks."""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info


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


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation: a hash of (seed, epoch, index) (numpy's SeedSequence)."""
    a, b = np.random.SeedSequence((seed % 2**32, epoch, index)).generate_state(2)
    return (int(a) << 32 | int(b)) & (2**63 - 1)


class SeededSamples(Dataset):
    """A dataset whose every sample is drawn under its own seed: ``dataset[i]`` of epoch ``e`` (fetched as
    ``self[(e, i)]``) runs with Python's, NumPy's and torch's global RNGs seeded from
    ``sample_seed(seed, e, i)``, and the RNG states are put back afterwards. Random crops, flips,
    RandAugment and erasing then give the same image whichever process loads it (0, 1 or 8 workers, any
    DDP rank), and the training process's own RNG stream (drop-path, dropout) is never touched by data
    loading."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list) -> list:
        """The samples of ``keys`` (a batch: the DataLoader asks for it whole), the caller's RNG states saved
        once before and put back once after."""
        # the transforms draw from the CPU generator alone: torch.manual_seed, which also seeds every device
        # generator, took about 0.25 ms a sample (15 % of a digits ResNet-20 epoch on 2 CPU cores)
        cpu = torch.default_generator
        in_worker = get_worker_info() is not None  # a loader worker's RNGs serve nothing else: no restore
        saved = None if in_worker else (random.getstate(), np.random.get_state(), cpu.get_state())
        try:
            return [self._drawn(cpu, *(key if isinstance(key, tuple) else (0, key))) for key in keys]
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                cpu.set_state(saved[2])

    def _drawn(self, cpu: torch.Generator, epoch: int, index: int):
        s = sample_seed(self.seed, epoch, index)
        random.seed(s)
        np.random.seed(s % 2**32)
        cpu.manual_seed(s)
        return self.dataset[index]


class WithEpoch(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` for each index of ``sampler`` (``SeededSamples`` keys); ``set_epoch`` is
    passed on. The epoch travels with every index, so persistent loader workers need no notice of it."""

    def __init__(self, sampler: EpochShuffle):
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


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
    batch dropped so BatchNorm and step counts stay stable; each sample's augmentation drawn from (seed,
    epoch, index), see ``SeededSamples``) and test loader.

    Args:
        batch_size: per-process batch. Under DDP the global batch is ``batch_size * world``, and the
            ranks together see exactly the batches of one process with that batch size.
        rank, world: this process's rank and the number of processes (1: no DDP).
        eval_batch_size: test batch (default ``batch_size``); the test set is sharded without padding.
    """
    train_sampler = WithEpoch(EpochShuffle(train, seed, batch_size, rank, world))
    test_sampler = Shard(test, rank, world) if world > 1 else None
    common = {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": torch.cuda.is_available()}
    # the loaders' own base seeds come from private generators, not from the training process's RNG
    train_loader = DataLoader(SeededSamples(train, seed), batch_size, sampler=train_sampler, drop_last=True,
                              generator=torch.Generator().manual_seed(seed), **common)
    test_loader = DataLoader(test, eval_batch_size or batch_size, sampler=test_sampler, shuffle=False,
                             generator=torch.Generator().manual_seed(seed), **common)
    return train_loader, test_loader
