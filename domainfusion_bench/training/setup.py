"""Setting a run up: seeds, data, splits, the algorithm and its ``prepare`` stage, on the run's device."""

from __future__ import annotations

import dataclasses
import inspect
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
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.training.args import Speed, TrainArgs, default_workers
from domainfusion_bench.training.context import TrainingContext
from domainfusion_bench.training.data_setup import data_to_device, load_data, make_splits
from domainfusion_bench.training.logs import Trackers
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
    trackers: Trackers | None = None  # --log_with
    uda_batches: Any = None  # --task domain_adaptation: the unlabelled held-out minibatches (the loop sets it)


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
    track = uda_track(ALGORITHMS.get(args.algorithm).TRACK, args)
    if track != "DG":  # labelled in every table (collect reads it from the args)
        record_args["track"] = track
    if runtime.is_main:
        runfiles.write_splits(run_dir, index_record, f"{dataset.name}_trial{args.trial_seed}_holdout{args.holdout_fraction}")
        print(f"{args.algorithm} on {dataset.name}, test envs {args.test_envs}, {steps} steps, hparams {hparams}")

    algorithm = ALGORITHMS.get(args.algorithm)(dataset.input_shape, dataset.num_classes, len(train_envs), hparams)
    if args.task == "domain_adaptation":
        check_takes_unlabeled(algorithm)
    if hasattr(getattr(algorithm, "featurizer", None), "describe"):  # e.g. a timm model's weights and data config
        record_args["protocol"]["featurizer"] = algorithm.featurizer.describe()
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
    trackers = Trackers(runtime.accelerator, run_dir, args, hparams, runtime.is_main)
    return Run(args, hparams, runtime, run_dir, speed, workers, dataset, steps, freq, splits, record_args, algorithm,
               context, train_splits, trackers=trackers)


def uda_track(track: str, args: TrainArgs) -> str:
    """The tables' label: a domain-adaptation run (unlabelled held-out images) is not a DG result, and a DG
    run with a UDA split set aside is scored on a smaller held-out in-split."""
    if args.uda_holdout_fraction <= 0:
        return track
    share = f"{args.uda_holdout_fraction:g} of the held-out in-split"
    label = f"UDA, {share} unlabelled" if args.task == "domain_adaptation" else f"{share} held back for UDA"
    return label if track == "DG" else f"{track}; {label}"


def check_takes_unlabeled(algorithm: Algorithm) -> None:
    if "unlabeled" not in inspect.signature(algorithm.update).parameters:
        raise DfbenchError(
            f"--task domain_adaptation gives update(minibatches, unlabeled=...) the held-out domains' unlabelled "
            f"images, but {type(algorithm).__name__}.update takes no `unlabeled` argument. Add one "
            "(`def update(self, minibatches, unlabeled=None)`), or run --task domain_generalization.")


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
    featurizer = getattr(algorithm, "featurizer", None)
    if hasattr(featurizer, "set_input_normalization"):  # featurizers that read [0, 1] images or their own statistics
        featurizer.set_input_normalization(getattr(context.dataset, "NORMALIZATION", None))
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


def write_previews(run_dir: Path, previews: list[runfiles.PreviewStrip]) -> None:
    """``previews/``: the strips of generated images and their ``index.json`` (the HTML leaderboard shows them)."""
    with runfiles.claimed(run_dir):
        runfiles.write_previews(run_dir, previews)
