"""Splits and loaders: per-step seeded batches, one bounded worker pool for all training domains.

Each step's indices are a function of (seed, domain, step) alone, so a resumed run draws exactly the
batches the uninterrupted run would have drawn, and DDP ranks can take disjoint slices of them.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler, TensorDataset

from domainfusion_bench.protocol import seed_hash


class SplitDataset(Dataset):
    """``dataset[indices[k]]`` with an optional transform on x (DomainBed's _SplitDataset)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Callable | None = None):
        self.dataset = dataset
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        x, y = self.dataset[self.indices[k]]
        return (self.transform(x) if self.transform else x), y

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(x, y) as tensors when the split is a transform-free view of a TensorDataset (the fast path)."""
        if self.transform is None and isinstance(self.dataset, TensorDataset):
            index = torch.as_tensor(self.indices, dtype=torch.long)
            x, y = self.dataset.tensors
            return x[index], y[index]
        return None


def step_indices(sizes: Sequence[int], batch_size: int, seed: int, step: int, rank: int = 0, world: int = 1):
    """Per-domain index tensors for one step: uniform with replacement, as DomainBed's infinite loaders."""
    out = []
    for domain, n in enumerate(sizes):
        g = torch.Generator().manual_seed(seed_hash(seed, domain, step))
        out.append(torch.randint(n, (batch_size,), generator=g)[rank::world])
    return out


class StepBatchSampler(Sampler):
    """Yields, for steps ``start..``, the concatenated indices of every domain into a ConcatDataset."""

    def __init__(self, sizes, batch_size, seed, start_step=0, rank=0, world=1):
        self.sizes, self.batch_size, self.seed = list(sizes), batch_size, seed
        self.start_step, self.rank, self.world = start_step, rank, world
        self.offsets = torch.tensor([0] + list(sizes[:-1])).cumsum(0).tolist()

    def __iter__(self):
        step = self.start_step
        while True:
            idx = step_indices(self.sizes, self.batch_size, self.seed, step, self.rank, self.world)
            yield torch.cat([i + off for i, off in zip(idx, self.offsets)]).tolist()
            step += 1


def training_batches(
    splits: Sequence[Dataset], batch_size: int, seed: int, start_step: int = 0, *,
    num_workers: int = 0, pin_memory: bool = False, rank: int = 0, world: int = 1,
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Infinite stream of minibatch lists, one (x, y) per training domain."""
    sizes = [len(s) for s in splits]
    tensors = [s.tensors() if isinstance(s, SplitDataset) else None for s in splits]
    if all(t is not None for t in tensors):
        return _tensor_batches(tensors, sizes, batch_size, seed, start_step, rank, world)
    return _loader_batches(splits, sizes, batch_size, seed, start_step, num_workers, pin_memory, rank, world)


def _tensor_batches(tensors, sizes, batch_size, seed, step, rank, world):
    while True:
        idx = step_indices(sizes, batch_size, seed, step, rank, world)
        yield [(x[i], y[i]) for (x, y), i in zip(tensors, idx)]
        step += 1


def _loader_batches(splits, sizes, batch_size, seed, start_step, num_workers, pin_memory, rank, world):
    sampler = StepBatchSampler(sizes, batch_size, seed, start_step, rank, world)
    loader = DataLoader(
        ConcatDataset(splits), batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
    )
    per_domain = [len(range(rank, batch_size, world))] * len(splits)
    for x, y in loader:
        yield list(zip(x.split(per_domain), y.split(per_domain)))


def eval_batches(split: Dataset, batch_size: int, *, num_workers: int = 0, pin_memory: bool = False,
                 rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over this rank's shard of a split, in order."""
    shard = range(rank, len(split), world)
    tensors = split.tensors() if isinstance(split, SplitDataset) else None
    if tensors is not None:
        x, y = tensors
        index = torch.as_tensor(list(shard), dtype=torch.long)
        for chunk in index.split(batch_size):
            yield x[chunk], y[chunk]
        return
    subset = torch.utils.data.Subset(split, list(shard))
    yield from DataLoader(subset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
