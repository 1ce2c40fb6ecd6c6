"""Evaluation: which splits a checkpoint scores, and the accuracy on one split, summed over ranks."""

from __future__ import annotations

from typing import Sequence

import torch

from domainfusion_bench.algorithms import Algorithm
from domainfusion_bench.data.loaders import SplitDataset, eval_batches
from domainfusion_bench.training.args import Speed
from domainfusion_bench.training.data_setup import model_input
from domainfusion_bench.training.runtime import Runtime


def splits_to_evaluate(n_domains: int, test_envs: Sequence[int], mode: str) -> list[str]:
    """``needed``: what model selection reads (train domains' out, test domains' in and out)."""
    if mode == "all":
        return [f"env{i}_{s}" for i in range(n_domains) for s in ("in", "out")]
    names = []
    for i in range(n_domains):
        names += [f"env{i}_in", f"env{i}_out"] if i in test_envs else [f"env{i}_out"]
    return names


def accuracy(algorithm: Algorithm, split: SplitDataset, runtime: Runtime, batch_size: int, workers: int,
             speed: Speed | None = None, key: tuple = ()) -> float:
    speed = (speed or Speed()).on(runtime.cuda)
    correct = torch.zeros(2, dtype=torch.float64, device=runtime.device)
    algorithm.eval()
    with torch.no_grad(), runtime.accelerator.autocast():
        for x, y in eval_batches(split, batch_size, num_workers=workers, pin_memory=speed.pin_memory,
                                 rank=runtime.rank, world=runtime.world, device=runtime.device, key=key):
            x = model_input(x, runtime, speed.channels_last)
            y = y.to(runtime.device, non_blocking=True)
            pred = algorithm.predict(x).argmax(1)
            correct += torch.stack([(pred == y).sum().double(), torch.tensor(float(len(y)), device=runtime.device)])
    algorithm.train()
    correct = runtime.sum_over_ranks(correct)
    return (correct[0] / correct[1].clamp(min=1)).item()
