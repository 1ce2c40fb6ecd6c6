"""Setting a run up: seeds, data, splits, the algorithm and its ``prepare`` stage, on the run's device."""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from domainfusion_bench import runfiles
from domainfusion_bench.algorithms import ALGORITHMS, Algorithm
from domainfusion_bench.costs import CostMeter, MetricMeter
from domainfusion_bench.data import MultiDomainDataset
from domainfusion_bench.data.loaders import SplitDataset
from domainfusion_bench.training.args import Speed, TrainArgs, default_workers
from domainfusion_bench.training.context import TrainingContext
from domainfusion_bench.training.data_setup import data_to_device, load_data, make_splits
from domainfusion_bench.training.runtime import Runtime


@dataclass
class Run:
    """A run in progress: what its loop reads, and where it stands (``resume`` moves it on)."""

    args: TrainArgs
    hparams: dict[str, Any]
    runtime: Runtime
    run_dir: Path
    speed: Speed
    workers: int
    dataset: MultiDomainDataset
    steps: int
    freq: int
    splits: dict[str, SplitDataset]  # evaluation splits by name
    record_args: dict[str, Any]
    algorithm: Algorithm
    context: TrainingContext
    train_splits: list[SplitDataset]  # what the batches come from (an algorithm may replace them)
    start_step: int = 0
    elapsed_before: float = 0.0
    diverged_at: int | None = None


def start_run(args: TrainArgs, hparams: dict[str, Any], runtime: Runtime, run_dir: Path,
              speed: Speed | None = None) -> Run:
    """Seed, load the data and its splits, build the algorithm and let it prepare; the splits go to
    ``splits.json`` and generated previews to ``previews/`` (main process only)."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    speed = (speed or Speed()).on(runtime.cuda)
    workers = default_workers(args)

    dataset = load_data(args, speed, workers=workers)
    steps = args.steps if args.steps is not None else dataset.N_STEPS
    freq = args.checkpoint_freq or dataset.CHECKPOINT_FREQ
    train_envs = [i for i in range(len(dataset.envs)) if i not in args.test_envs]
    train_splits, splits, index_record = make_splits(dataset, args, hparams, speed.eval_augment or args.eval_augment)
    record_args = {**dataclasses.asdict(args), "protocol": protocol_settings(runtime, speed, args, dataset)}
    track = ALGORITHMS.get(args.algorithm).TRACK
    if track != "DG":  # labelled in every table (collect reads it from the args)
        record_args["track"] = track
    if runtime.is_main:
        runfiles.write_splits(run_dir, index_record, f"{dataset.name}_trial{args.trial_seed}_holdout{args.holdout_fraction}")
        print(f"{args.algorithm} on {dataset.name}, test envs {args.test_envs}, {steps} steps, hparams {hparams}")

    algorithm = ALGORITHMS.get(args.algorithm)(dataset.input_shape, dataset.num_classes, len(train_envs), hparams)
    costs, metrics = CostMeter(), MetricMeter()
    batch_size = hparams["batch_size"]
    context = TrainingContext(
        dataset, train_envs, list(args.test_envs), train_splits, hparams, args, runtime.device, costs,
        Path(args.data_dir) / ".dfbench_cache", metrics=metrics, made_by=str(run_dir.resolve()),
        steps_per_epoch=min(len(s) / batch_size for s in train_splits), autocast=runtime.accelerator.autocast,
        heartbeat=(lambda: runfiles.heartbeat(run_dir)) if runtime.is_main else (lambda: None), is_main=runtime.is_main)
    train_splits = set_up(algorithm, context, list(splits.values()), runtime, speed)
    if runtime.is_main and context.previews:
        write_previews(run_dir, context.previews)
    return Run(args, hparams, runtime, run_dir, speed, workers, dataset, steps, freq, splits, record_args, algorithm,
               context, train_splits)


def protocol_settings(runtime: Runtime, speed: Speed, args: TrainArgs, dataset: MultiDomainDataset) -> dict[str, Any]:
    """What this run did where dfbench differs from DomainBed 2020 (README, "Differences, on purpose"),
    recorded in every record's ``args`` so a number says how it was made."""
    return {"precision": "bf16" if runtime.accelerator.mixed_precision == "bf16" else "fp32",
            "cudnn_benchmark": bool(runtime.cuda and torch.backends.cudnn.benchmark),
            "eval_augment": bool(speed.eval_augment or args.eval_augment),
            "eval_splits": args.eval_splits,
            "image_store": getattr(dataset, "store_protocol", None),  # None: not a folder dataset
            # several processes: whether the algorithm's loss makes DDP exactly the 1-process run (README)
            **({"processes": runtime.world, "ddp_exact": bool(ALGORITHMS.get(args.algorithm).DDP_EXACT)}
               if runtime.world > 1 else {}),
            "dataset": list(getattr(dataset, "DIFFERENCES", ()))}


def set_up(algorithm: Algorithm, context: TrainingContext, eval_splits: Sequence[SplitDataset], runtime: Runtime,
           speed: Speed) -> list[SplitDataset]:
    """Put the model on its device, let the algorithm prepare (a generative one trains helpers and
    generates here, on that device and in the run's precision), put the data on the device and build the
    optimizers. Under DDP the main process prepares first; the others then find its work in the caches.
    Returns the splits it trains on."""
    algorithm.to(runtime.device)
    with runtime.accelerator.main_process_first():
        replaced = algorithm.prepare(context)
    train_splits = list(context.train_splits if replaced is None else replaced)
    data_to_device(train_splits + list(eval_splits), runtime.device, speed)
    algorithm.to(runtime.device)  # prepare may have added modules
    if speed.on(runtime.cuda).channels_last:
        algorithm.to(memory_format=torch.channels_last)
    params = [p for p in algorithm.parameters() if p.requires_grad]
    algorithm.backward = lambda loss, **kw: runtime.backward(loss, params, **kw)
    runtime.distribute(algorithm, params)
    algorithm.setup_optimizers()
    return train_splits


def write_previews(run_dir: Path, previews: dict[str, torch.Tensor]) -> None:
    """``previews/<name>.png``: a row of generated images per stage and domain (the HTML leaderboard shows them)."""
    from torchvision.utils import save_image

    folder = run_dir / runfiles.PREVIEWS
    folder.mkdir(exist_ok=True)
    for name, images in previews.items():
        path = folder / f"{name}.png"
        if not path.exists():
            tmp = folder / f".{name}.tmp{os.getpid()}.png"
            save_image(images.float().div(255.0) if images.dtype == torch.uint8 else images, str(tmp),
                       nrow=len(images), padding=1)
            with runfiles.claimed(run_dir):
                os.replace(tmp, path)
