"""Splits and loaders: per-step seeded batches, one bounded worker pool for all training domains.

Each step's indices are a function of (seed, domain, step) alone, so a resumed run draws exactly the
batches the uninterrupted run would have drawn, and DDP ranks can take disjoint slices of them.

Fast path: a split over a TensorDataset (embedded datasets, and folder datasets decoded into a uint8
store) is served by indexing tensors, with no workers; its ``batch_transform`` (normalisation, or
batched augmentation drawn from a generator seeded by (seed, domain, step)) runs on the device.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler, TensorDataset

from domainfusion_bench.protocol import seed_hash


class SplitDataset(Dataset):
    """``dataset[indices[k]]`` with an optional transform on x (DomainBed's _SplitDataset)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Callable | None = None,
                 batch_transform: Callable | None = None):
        self.dataset = dataset
        self.indices = list(indices)
        self.transform = transform
        # batched, on-device equivalent of ``transform``: (x, generator) -> x; set for stored images
        self.batch_transform = batch_transform

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

    def tensor_view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(x, y, rows of this split) when batches can be cut from tensors and finished by ``batch_transform``."""
        if isinstance(self.dataset, TensorDataset) and (self.transform is None or self.batch_transform is not None):
            x, y = self.dataset.tensors
            return x, y, torch.as_tensor(self.indices, dtype=torch.long)
        return None


def step_indices(sizes: Sequence[int], batch_size: int, seed: int, step: int, rank: int = 0, world: int = 1):
    """Per-domain index tensors for one step: uniform with replacement, as DomainBed's infinite loaders."""
    return [domain_step_indices(n, domain, batch_size, seed, step, rank, world) for domain, n in enumerate(sizes)]


def domain_step_indices(n: int, domain: int, batch_size: int, seed: int, step: int, rank: int = 0, world: int = 1):
    g = torch.Generator().manual_seed(seed_hash(seed, domain, step))
    return torch.randint(n, (batch_size,), generator=g)[rank::world]


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


def seeded_generator(device: torch.device | str, *key) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed_hash(*key))


def _finish(x: torch.Tensor, transform: Callable | None, device, pin_memory: bool, generator_key,
            sizes: torch.Tensor | None = None, part: slice = slice(None), whole: int | None = None) -> torch.Tensor:
    """Copy a tensor batch to ``device`` (uint8 when stored: 4x fewer bytes) and apply the batch transform.

    A random transform (``RANDOM``, e.g. AugmentBatch) draws for the whole global batch (``whole``
    images, default ``len(x)``; their original (height, width) are ``sizes``, default the stored size)
    and applies the draws ``part`` to ``x``, this rank's slice of it: each image gets the draw it gets
    in one process."""
    if pin_memory and x.device.type == "cpu":
        x = x.pin_memory()
    x = x.to(device, non_blocking=True)
    if transform is None:
        return x
    generator = seeded_generator(x.device, *generator_key)
    if not getattr(transform, "RANDOM", False):
        return transform(x, generator)
    if sizes is None:
        sizes = torch.tensor([x.shape[-2:]], dtype=torch.long).expand(whole or len(x), 2)
    return transform(x, generator, sizes, part)


def training_batches(
    splits: Sequence[Dataset], batch_size: int, seed: int, start_step: int = 0, *,
    num_workers: int = 0, pin_memory: bool = False, rank: int = 0, world: int = 1,
    device: torch.device | str = "cpu", per_domain_loaders: bool = False,
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Infinite stream of minibatch lists, one (x, y) per training domain.

    Tensor-backed splits come out on ``device``, transformed; loader batches come out on the CPU.
    ``per_domain_loaders`` gives every domain its own DataLoader of ``num_workers`` (DomainBed's setting).
    """
    sizes = [len(s) for s in splits]
    views = [s.tensor_view() if isinstance(s, SplitDataset) else None for s in splits]
    if all(v is not None for v in views):
        transforms = [s.batch_transform for s in splits]
        originals = [getattr(s.dataset, "original_sizes", None) for s in splits]
        return _tensor_batches(views, transforms, sizes, batch_size, seed, start_step, rank, world, device, pin_memory,
                               originals)
    if per_domain_loaders:
        return _per_domain_batches(splits, sizes, batch_size, seed, start_step, num_workers, pin_memory, rank, world)
    return _loader_batches(splits, sizes, batch_size, seed, start_step, num_workers, pin_memory, rank, world)


def _tensor_batches(views, transforms, sizes, batch_size, seed, step, rank, world, device, pin_memory, originals=None):
    originals = originals or [None] * len(views)
    part = slice(rank, None, world)
    while True:
        idx = step_indices(sizes, batch_size, seed, step)  # the global batch: augmentation is drawn for it
        batch = []
        for domain, ((x, y, rows), i, tf, orig) in enumerate(zip(views, idx, transforms, originals)):
            every = rows[i]
            r = every[part]
            xb = _finish(x[r.to(x.device)], tf, device, pin_memory, (seed, domain, step, "augment"),
                         None if orig is None else orig[every], part, len(every))
            batch.append((xb, y[r.to(y.device)]))
        yield batch
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


class DomainStepSampler(Sampler):
    """One domain's indices for steps ``start..``: the same draws as ``StepBatchSampler``'s slice for it."""

    def __init__(self, n, domain, batch_size, seed, start_step=0, rank=0, world=1):
        self.n, self.domain, self.batch_size, self.seed = n, domain, batch_size, seed
        self.start_step, self.rank, self.world = start_step, rank, world

    def __iter__(self):
        step = self.start_step
        while True:
            yield domain_step_indices(self.n, self.domain, self.batch_size, self.seed, step, self.rank, self.world).tolist()
            step += 1


def _per_domain_batches(splits, sizes, batch_size, seed, start_step, num_workers, pin_memory, rank, world):
    """One DataLoader per domain, each with its own workers, zipped (DomainBed's InfiniteDataLoaders)."""
    loaders = [
        DataLoader(split, batch_sampler=DomainStepSampler(n, d, batch_size, seed, start_step, rank, world),
                   num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0)
        for d, (split, n) in enumerate(zip(splits, sizes))
    ]
    yield from (list(batch) for batch in zip(*loaders))


def eval_batches(split: Dataset, batch_size: int, *, num_workers: int = 0, pin_memory: bool = False,
                 rank: int = 0, world: int = 1, device: torch.device | str = "cpu", key: tuple = (),
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over this rank's shard of a split, in order (tensor-backed splits: on ``device``). A
    random batch transform (``--eval_augment``) crops on the images' original sizes, from generators
    keyed by ``key`` (the caller's: seed, step, split), the rank and the batch."""
    shard = range(rank, len(split), world)
    view = split.tensor_view() if isinstance(split, SplitDataset) else None
    if view is not None:
        x, y, rows = view
        orig = getattr(split.dataset, "original_sizes", None)
        for k, chunk in enumerate(rows[list(shard)].split(batch_size)):
            xb = _finish(x[chunk.to(x.device)], split.batch_transform, device, pin_memory, ("eval", *key, rank, k),
                         None if orig is None else orig[chunk])
            yield xb, y[chunk.to(y.device)]
        return
    subset = torch.utils.data.Subset(split, list(shard))
    yield from DataLoader(subset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
