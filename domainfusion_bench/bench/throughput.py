"""Throughput of one training set-up, measured in one process (issue 6).

For each speed profile: (a) training images/s through the real pipeline (dataset, store or loaders,
transforms, copies, the algorithm's update), (b) the ceiling: the same model and batch shapes fed one
fixed minibatch already on the device, (c) evaluation images/s over the splits the profile evaluates,
(d) peak memory. ``fast`` is the trainer's default; ``domainbed`` reproduces DomainBed's settings.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from domainfusion_bench.algorithms import ALGORITHMS
from domainfusion_bench.costs import CostMeter
from domainfusion_bench.data import get_dataset
from domainfusion_bench.data.loaders import training_batches
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.hparams import parse_hparams_json
from domainfusion_bench.paths import DEFAULT_DATA_DIR
from domainfusion_bench.training import (
    Runtime, Speed, TrainArgs, TrainingContext, accuracy, default_workers, load_data,
    make_splits, model_input, resolve_hparams, set_up, splits_to_evaluate,
)


@dataclass(frozen=True)
class Profile:
    """Everything that differs between DomainBed's way of feeding the device and dfbench's."""

    name: str
    precision: str  # TrainArgs.precision: auto = bf16 on CUDA
    num_workers: int | None  # per loader (domainbed) or for the one shared pool (None: trainer default)
    eval_batch_size: int | None  # None: trainer default (1024 on CUDA, 256 on CPU)
    eval_splits: str  # needed | all
    speed: Speed = field(default_factory=Speed)


PROFILES = {
    "fast": Profile("fast", "auto", None, None, "needed", Speed()),
    "domainbed": Profile("domainbed", "fp32", 8, 64, "all", Speed.domainbed()),
}


@dataclass
class BenchOptions:
    dataset: str = "synthetic-pacs"
    algorithm: str = "ERM"
    backbone: str = "resnet50"
    resolution: int | None = 224  # None: the dataset's own
    batch_size: int = 32  # per training domain, as DomainBed's hparam
    steps: int = 20  # timed steps, after `warmup` untimed ones
    warmup: int = 3
    device: str = "auto"
    test_envs: list[int] = field(default_factory=lambda: [0])
    data_dir: str = DEFAULT_DATA_DIR
    profiles: list[str] = field(default_factory=lambda: ["fast"])
    num_workers: int | None = None  # overrides every profile's worker count
    hparams: str | None = None  # further JSON overrides (e.g. '{"cnn_width": 16}')
    threads: int | None = None  # torch intra-op threads (None: torch's default); matters on a busy CPU


def _sync(runtime: Runtime) -> None:
    if runtime.cuda:
        torch.cuda.synchronize()


def _settings(profile: Profile, runtime: Runtime, workers: int, eval_bs: int, stored: bool) -> dict[str, Any]:
    s = profile.speed.on(runtime.cuda)
    return {
        "precision": str(runtime.accelerator.mixed_precision) if runtime.accelerator.mixed_precision != "no" else "fp32",
        "channels_last": s.channels_last,
        "pin_memory": s.pin_memory,
        "image_store": stored,
        "workers": f"{workers} per training domain" if s.per_domain_loaders else f"{workers} shared",
        "eval_batch_size": eval_bs,
        "eval_splits": profile.eval_splits,
        "eval_augment": s.eval_augment,
    }


def bench_profile(opts: BenchOptions, profile: Profile) -> dict[str, Any]:
    overrides = {"backbone": opts.backbone, "pretrained": "none", "batch_size": opts.batch_size,
                 **parse_hparams_json(opts.hparams)}
    args = TrainArgs(dataset=opts.dataset, algorithm=opts.algorithm, test_envs=list(opts.test_envs),
                     data_dir=opts.data_dir, device=opts.device, precision=profile.precision,
                     num_workers=opts.num_workers if opts.num_workers is not None else profile.num_workers,
                     eval_batch_size=profile.eval_batch_size, eval_splits=profile.eval_splits,
                     hparams=json.dumps(overrides))
    hparams = resolve_hparams(args)
    runtime = Runtime(args)
    if runtime.cuda:
        torch.cuda.reset_peak_memory_stats()
    speed, workers = profile.speed.on(runtime.cuda), default_workers(args)
    cls = ALGORITHMS.get(args.algorithm)

    dataset = get_dataset(args.dataset, args.data_dir)
    if opts.resolution is not None and tuple(dataset.input_shape[-2:]) != (opts.resolution,) * 2:
        if not hasattr(dataset, "set_resolution"):
            raise DfbenchError(f"{dataset.name} has a fixed input size {dataset.input_shape}; "
                               "--resolution applies to image-folder datasets only (leave it out)")
        dataset.set_resolution(opts.resolution)
    started = time.perf_counter()
    dataset = load_data(args, speed, dataset, workers)
    load_seconds = time.perf_counter() - started
    train_splits, splits, _ = make_splits(dataset, args, hparams, speed.eval_augment)
    train_envs = [i for i in range(len(dataset.envs)) if i not in args.test_envs]
    algorithm = cls(dataset.input_shape, dataset.num_classes, len(train_envs), hparams)
    context = TrainingContext(dataset, train_envs, list(args.test_envs), train_splits, hparams, args,
                              runtime.device, CostMeter(), Path(args.data_dir) / ".dfbench_cache",
                              autocast=runtime.accelerator.autocast)
    train_splits = set_up(algorithm, context, list(splits.values()), runtime, speed)

    batches = training_batches(train_splits, hparams["batch_size"], args.seed, num_workers=workers,
                               pin_memory=speed.pin_memory, rank=runtime.rank, world=runtime.world,
                               device=runtime.device, per_domain_loaders=speed.per_domain_loaders)

    def next_minibatches():
        return [(model_input(x, runtime, speed.channels_last), y.to(runtime.device, non_blocking=True))
                for x, y in next(batches)]

    def step(minibatches) -> None:
        with runtime.accelerator.autocast():
            algorithm.update(minibatches)

    def timed(make_batch) -> float:
        for _ in range(opts.warmup):
            step(make_batch())
        _sync(runtime)
        start = time.perf_counter()
        for _ in range(opts.steps):
            step(make_batch())
        _sync(runtime)
        return time.perf_counter() - start

    train_seconds = timed(next_minibatches)
    fixed = next_minibatches()
    images_per_step = sum(len(y) for _, y in fixed) * runtime.world
    ceiling_seconds = timed(lambda: fixed)

    eval_bs = args.eval_batch_size or (1024 if runtime.cuda else 256)
    names = splits_to_evaluate(len(dataset.envs), args.test_envs, args.eval_splits)
    _sync(runtime)
    start = time.perf_counter()
    for name in names:
        accuracy(algorithm, splits[name], runtime, eval_bs, workers, speed)
    _sync(runtime)
    eval_seconds = time.perf_counter() - start
    eval_images = sum(len(splits[n]) for n in names)

    train_ips = images_per_step * opts.steps / train_seconds
    ceiling_ips = images_per_step * opts.steps / ceiling_seconds
    return {
        "profile": profile.name,
        "device": str(runtime.device) if not runtime.cuda else torch.cuda.get_device_name(runtime.device),
        "dataset": dataset.name, "algorithm": args.algorithm, "backbone": hparams.get("backbone"),
        "resolution": dataset.input_shape[-1], "batch_size_per_domain": hparams["batch_size"],
        "images_per_step": images_per_step, "steps": opts.steps, "warmup": opts.warmup,
        "settings": _settings(profile, runtime, workers, eval_bs, bool(getattr(dataset, "stored", False))),
        "data_load_seconds": load_seconds,
        "train_images_per_s": train_ips,
        "ceiling_images_per_s": ceiling_ips,
        "train_over_ceiling": train_ips / ceiling_ips,
        "eval_images_per_s": eval_images / eval_seconds,
        "eval_images": eval_images,
        "peak_memory_gb": runtime.peak_memory_gb(),
        "memory_kind": "cuda_max_allocated" if runtime.cuda else "cpu_peak_rss_process",
    }


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    unknown = [p for p in opts.profiles if p not in PROFILES]
    if unknown:
        raise DfbenchError(f"unknown profile {unknown[0]!r}; choices: {', '.join(PROFILES)}, both")
    if opts.steps < 1 or opts.warmup < 0 or opts.batch_size < 1:
        raise DfbenchError("--steps and --batch_size must be >= 1 and --warmup >= 0")
    ALGORITHMS.get(opts.algorithm)  # fail fast on a misspelt name
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    load_before = os.getloadavg()[0]
    results = [bench_profile(opts, PROFILES[name]) for name in opts.profiles]
    machine = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "load_average_1min": [load_before, os.getloadavg()[0]]}
    report: dict[str, Any] = {"options": asdict(opts), "machine": machine, "profiles": results}
    by_name = {r["profile"]: r for r in results}
    if {"fast", "domainbed"} <= set(by_name):
        report["fast_over_domainbed"] = by_name["fast"]["train_images_per_s"] / by_name["domainbed"]["train_images_per_s"]
        report["eval_fast_over_domainbed"] = by_name["fast"]["eval_images_per_s"] / by_name["domainbed"]["eval_images_per_s"]
    return report


def format_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"machine: {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, load average "
             f"{m['load_average_1min'][0]:.1f} before / {m['load_average_1min'][1]:.1f} after"]
    for r in report["profiles"]:
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        lines += [
            f"[{r['profile']}] {r['algorithm']} {r['backbone']} {r['resolution']}px on {r['dataset']}, "
            f"{r['images_per_step']} images/step, {r['steps']} steps, device {r['device']}",
            f"  settings: {settings}",
            f"  (a) training  {r['train_images_per_s']:9.1f} images/s  (real pipeline)",
            f"  (b) ceiling   {r['ceiling_images_per_s']:9.1f} images/s  (fixed batch on the device)",
            f"  (a)/(b)       {r['train_over_ceiling']:9.3f}",
            f"  (c) eval      {r['eval_images_per_s']:9.1f} images/s  ({r['eval_images']} images, {r['settings']['eval_splits']} splits)",
            f"  (d) peak mem  {r['peak_memory_gb']:9.3f} GiB  ({r['memory_kind']})",
        ]
    if "fast_over_domainbed" in report:
        lines.append(f"fast / domainbed: training {report['fast_over_domainbed']:.2f}x, "
                     f"eval {report['eval_fast_over_domainbed']:.2f}x")
    return "\n".join(lines) + "\n"
