"""DomainBed's loop: a minibatch from every training domain per step; every ``checkpoint_freq`` steps an
evaluation, one record and a resume point; the model and ``done`` last."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from domainfusion_bench import runfiles
from domainfusion_bench.data.loaders import training_batches
from domainfusion_bench.training.args import Speed, TrainArgs
from domainfusion_bench.training.data_setup import data_to_device, model_input, uda_batches
from domainfusion_bench.training.evaluation import accuracy, splits_to_evaluate
from domainfusion_bench.training.resume import resume, resume_state
from domainfusion_bench.training.runtime import Runtime
from domainfusion_bench.training.setup import Run, start_run


def _new_window() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Loss sums and timings since the last record."""
    return {}, {"step": 0.0, "data": 0.0, "n": 0, "images": 0}


def _train(args: TrainArgs, hparams: dict[str, Any], runtime: Runtime, run_dir: Path, speed: Speed | None = None) -> None:
    run = start_run(args, hparams, runtime, run_dir, speed)
    resume(run)
    runtime.set_global_batch(hparams["batch_size"], run.algorithm)
    runtime.seed_rank(args.seed, run.start_step)  # after resume: a resume point holds the main rank's streams
    eval_bs = args.eval_batch_size or (1024 if runtime.cuda else 256)

    def batches_from(step: int):
        return training_batches(run.train_splits, hparams["batch_size"], args.seed, step, num_workers=run.workers,
                                pin_memory=run.speed.pin_memory, rank=runtime.rank, world=runtime.world,
                                device=runtime.device, per_domain_loaders=run.speed.per_domain_loaders)

    batches = batches_from(run.start_step)
    run.uda_batches = uda_batches(run.splits, args, hparams, runtime, run.start_step)
    eval_names = splits_to_evaluate(len(run.dataset.envs), args.test_envs, args.eval_splits)
    sums, timing = _new_window()
    run_start = time.perf_counter()
    for step in range(run.start_step, run.steps):
        replaced = run.algorithm.on_step(step, run.context)
        if replaced is not None:  # e.g. a refreshed synthetic pool: batches from this step on come from it
            run.train_splits = list(replaced)
            data_to_device(run.train_splits, runtime.device, run.speed)
            batches = batches_from(step)
        _step(run, step, batches, sums, timing)
        if step % run.freq == 0 or step == run.steps - 1:
            _checkpoint(run, step, sums, timing, run_start, eval_names, eval_bs)
            sums, timing = _new_window()
    _finish(run)


def _step(run: Run, step: int, batches: Iterator, sums: dict[str, torch.Tensor], timing: dict[str, Any]) -> None:
    """One training step, its loss terms added to ``sums`` and its time to ``timing``."""
    runtime = run.runtime
    t0 = time.perf_counter()
    minibatches = [(model_input(x, runtime, run.speed.channels_last), y.to(runtime.device, non_blocking=True))
                   for x, y in next(batches)]
    t1 = time.perf_counter()
    extra = {}
    if run.uda_batches is not None:  # --task domain_adaptation: the held-out domains' unlabelled images
        extra["unlabeled"] = [model_input(x, runtime, run.speed.channels_last) for x, _ in next(run.uda_batches)]
    with runtime.accelerator.autocast():
        terms = run.algorithm.update(minibatches, **extra)
    for name, value in terms.items():
        sums[name] = sums.get(name, 0.0) + torch.as_tensor(value, dtype=torch.float32).detach()
    if runtime.cuda and (step + 1) % 50 == 0:
        torch.cuda.synchronize()  # keep step_time honest without syncing every step
    t2 = time.perf_counter()
    timing["step"] += t2 - t0
    timing["data"] += t1 - t0
    timing["n"] += 1
    timing["images"] += sum(len(y) for _, y in minibatches) * runtime.world


def _checkpoint(run: Run, step: int, sums: dict[str, torch.Tensor], timing: dict[str, Any], run_start: float,
                eval_names: Sequence[str], eval_bs: int) -> None:
    """Evaluate, append the record, then save the resume point (main process)."""
    args, hparams, runtime = run.args, run.hparams, run.runtime
    n = max(timing["n"], 1)
    losses = {name: runtime.batch_mean_over_ranks(total / n).item() for name, total in sums.items()}
    if run.diverged_at is None and not all(np.isfinite(v) for v in losses.values()):
        run.diverged_at = step  # DomainBed keeps a diverged run's checkpoints in selection: so do we
        print(f"warning: loss became non-finite by step {step} ({args.algorithm}, lr={hparams['lr']}): the run "
              "diverged; it goes on as in DomainBed and its records say diverged_at", file=sys.stderr)
    record = {
        "step": step,
        "epoch": step / run.context.steps_per_epoch,  # of the real in-splits, whatever synthetic data is added
        **losses,
        "step_time": timing["step"] / n,
        "data_time": timing["data"] / n,
        "images_per_s": timing["images"] / max(timing["step"], 1e-9),
    }
    for name in eval_names:
        record[f"{name}_acc"] = accuracy(run.algorithm, run.splits[name], runtime, eval_bs, min(run.workers, 4),
                                         run.speed, key=(args.seed, step, name))
    elapsed = run.elapsed_before + time.perf_counter() - run_start
    record.update(mem_gb=runtime.peak_memory_gb(), wall_time=elapsed, hparams=hparams, args=run.record_args)
    record.update(run.context.costs.record_fields())
    record.update(run.context.metrics.record_fields())
    if run.diverged_at is not None:
        record["diverged_at"] = run.diverged_at
    if runtime.is_main:
        runfiles.append_record(run.run_dir, record)
        run.trackers.log(record)
        if args.save_model_every_checkpoint:  # DomainBed's model_step{step}.pkl
            save_model(run, run.run_dir / f"model_step{step}.pkl")
        accs = " ".join(f"{k[:-4]}={v:.3f}" for k, v in record.items() if k.endswith("_acc"))
        print(f"step {step:5d}  loss {losses.get('loss', float('nan')):.4f}  {accs}  "
              f"{record['images_per_s']:.0f} img/s")
        runfiles.save_resume(run.run_dir / runfiles.RESUME, resume_state(run, step, elapsed))
        runfiles.heartbeat(run.run_dir)


def save_model(run: Run, path: Path) -> None:
    """DomainBed's model file: the arguments, the shapes and the algorithm's state dict."""
    dataset = run.dataset
    torch.save({"args": run.record_args, "model_input_shape": dataset.input_shape,
                "model_num_classes": dataset.num_classes, "model_num_domains": len(run.context.train_envs),
                "model_hparams": run.hparams, "model_dict": run.algorithm.state_dict()}, path)


def _finish(run: Run) -> None:
    """The model (unless ``skip_model_save``), then ``done``; the resume point is no longer needed."""
    runtime, run_dir = run.runtime, run.run_dir
    runtime.accelerator.wait_for_everyone()
    if runtime.is_main:
        runfiles.check_claim(run_dir)
        if not run.args.skip_model_save:
            save_model(run, run_dir / runfiles.MODEL)
        run.trackers.end()
        runfiles.write_done(run_dir)
        (run_dir / runfiles.RESUME).unlink(missing_ok=True)
