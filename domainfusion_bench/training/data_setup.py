"""The run's data: its dataset (in the uint8 store when small), the in/out splits, and tensors on the device."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch

from domainfusion_bench.data import MultiDomainDataset, get_dataset
from domainfusion_bench.data.loaders import SplitDataset
from domainfusion_bench.protocol import split_indices
from domainfusion_bench.training.args import Speed, TrainArgs
from domainfusion_bench.training.runtime import Runtime


def make_splits(dataset: MultiDomainDataset, args: TrainArgs, hparams: dict[str, Any], eval_augment: bool = False):
    """(training splits, evaluation splits by name, index record).

    Training splits are the training domains' in-splits with the training transform. Evaluation splits
    are every in/out split without augmentation, or, with ``eval_augment`` (DomainBed), the training
    domains' splits with the training transform.
    """
    augment = hparams.get("data_augmentation", True)
    eval_tf, train_tf = dataset.eval_transform(), dataset.train_transform(augment)
    batch_tf = getattr(dataset, "batch_transform", lambda augment: None)  # stored folder datasets have one
    eval_btf, train_btf = batch_tf(False), batch_tf(augment)
    # a store crops from its larger copy (the detail of the original), and evaluates on the resized one
    crop_envs = getattr(dataset, "crop_envs", None) if getattr(dataset, "stored", False) and augment else None
    train, splits, index_record = [], {}, {}
    for i, env in enumerate(dataset.envs):
        out_idx, in_idx = split_indices(len(env), args.trial_seed, i, args.holdout_fraction)
        train_env = crop_envs[i] if crop_envs else env
        if i not in args.test_envs:
            train.append(SplitDataset(train_env, in_idx, train_tf, train_btf))
        augmented = eval_augment and i not in args.test_envs
        tf, btf, src = (train_tf, train_btf, train_env) if augmented else (eval_tf, eval_btf, env)
        splits[f"env{i}_in"] = SplitDataset(src, in_idx, tf, btf)
        splits[f"env{i}_out"] = SplitDataset(src, out_idx, tf, btf)
        index_record[f"env{i}"] = {"domain": dataset.domains[i], "in": in_idx, "out": out_idx}
    return train, splits, index_record


def load_data(args: TrainArgs, speed: Speed, dataset: MultiDomainDataset | None = None, workers: int = 0) -> MultiDomainDataset:
    """The run's dataset, decoded into the uint8 store when it is a small folder dataset."""
    dataset = dataset or get_dataset(args.dataset, args.data_dir)
    dataset.check_test_envs(args.test_envs)
    store = getattr(dataset, "load_store", None)
    if store is None:
        return dataset
    cache = Path(args.data_dir) / ".dfbench_cache"
    # which path ran goes to args["protocol"]: the store limit (DFBENCH_STORE_GB) is not in the run's hash
    if args.no_image_store or not speed.image_store:
        dataset.store_protocol = {"used": False, "why": "--no_image_store" if args.no_image_store else "Speed"}
    elif not dataset.stored and dataset.store_bytes(cache) > speed.store_max_gb * 2**30:
        dataset.store_protocol = {"used": False, "why": f"{dataset.store_bytes(cache) / 2**30:.1f} GiB > "
                                                        f"DFBENCH_STORE_GB {speed.store_max_gb:g}"}
    else:
        if not dataset.stored:
            started = time.perf_counter()
            path = store(cache, num_workers=workers)
            print(f"image store: {path} ({dataset.store_bytes(cache) / 2**30:.2f} GiB, "
                  f"{time.perf_counter() - started:.1f} s)")
        dataset.store_protocol = {"used": True, "crop_copy_px": dataset.crop_size, "resolution": dataset.resolution,
                                  "crop_copy_is_original": bool(dataset.crop_copy_is_original)}
    return dataset


def data_to_device(splits: Sequence[SplitDataset], device: torch.device, speed: Speed) -> None:
    """Move the tensors behind tensor-backed splits onto the GPU once, when they take <= 1/4 of its memory."""
    if device.type != "cuda" or not speed.data_on_device:
        return
    datasets = {id(s.dataset): s.dataset for s in splits if isinstance(s, SplitDataset) and s.tensor_view() is not None}
    total = sum(t.numel() * t.element_size() for d in datasets.values() for t in d.tensors)
    if total <= torch.cuda.get_device_properties(device).total_memory / 4:
        for d in datasets.values():
            d.tensors = tuple(t.to(device) for t in d.tensors)


def model_input(x: torch.Tensor, runtime: "Runtime", channels_last: bool) -> torch.Tensor:
    x = x.to(runtime.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x
