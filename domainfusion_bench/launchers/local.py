"""The pool of child processes that local, multi_gpu and accelerate share, and the local launcher."""

from __future__ import annotations

import os
import queue
import threading
from typing import Sequence

from tqdm.auto import tqdm

from domainfusion_bench.launchers.base import (
    LAUNCHERS, Launcher, LaunchResult, positive_option, progress_bar, report_outcome,
)
from domainfusion_bench.launchers.child import run_job
from domainfusion_bench.sweep import Job, module_prefix


def pipeline_order(jobs: Sequence[Job]) -> list[Job]:
    """The order for several slots. Generative runs share pre-stages (one DDPM per set of training domains,
    per-trial helper models) trained under file locks, so a slot that starts a second generative run early
    only waits. One generative run goes first (it trains the shared DDPM), the other slots take the
    non-generative runs meanwhile, then the remaining generative runs by (algorithm, trial) so that
    parallel slots work on different trials' helper models rather than queue on one lock."""
    from domainfusion_bench.algorithms import ALGORITHMS

    def generative(job: Job) -> bool:
        return job.args.algorithm in ALGORITHMS and bool(getattr(ALGORITHMS.get(job.args.algorithm), "GENERATIVE", False))

    gen = [j for j in jobs if generative(j)]
    if not gen:
        return list(jobs)
    rest = sorted(gen[1:], key=lambda j: (j.args.dataset, j.args.test_envs, j.args.algorithm, j.args.trial_seed))
    return [gen[0]] + [j for j in jobs if not generative(j)] + rest


class PoolLauncher(Launcher):
    """Runs jobs in child processes, one per slot at a time; a slot is a label and its environment."""

    def prefix(self) -> list[str] | None:
        """The command before ``train ...``; None forks each run from a preloaded server instead."""
        return module_prefix()

    def slots(self) -> list[tuple[str, dict[str, str]]]:
        return [("", dict(os.environ))]

    def threads(self) -> int | None:
        return None

    def check(self) -> None:
        self.slots(), self.threads()

    def launch(self, jobs: Sequence[Job]) -> LaunchResult:
        slots, prefix, torch_threads = self.slots(), self.prefix(), self.threads()
        if not jobs:
            return LaunchResult()
        todo: queue.Queue[Job] = queue.Queue()
        for job in (pipeline_order(jobs) if len(slots) > 1 else jobs):
            todo.put(job)
        stop = threading.Event()
        result, lock = LaunchResult(), threading.Lock()
        running: dict[int, str] = {}  # slot number -> what it runs

        def worker(slot: int, env: dict[str, str], bar: tqdm) -> None:
            while not stop.is_set():
                try:
                    job = todo.get_nowait()
                except queue.Empty:
                    return
                with lock:
                    running[slot] = f"{job.args.algorithm} {job.args.dataset} {job.args.test_envs}"
                    bar.set_postfix_str(" | ".join(running.values()), refresh=True)
                outcome = run_job(job, prefix, env, torch_threads)
                with lock:
                    running.pop(slot, None)
                    report_outcome(bar, job, outcome, result)

        labels = [label for label, _ in slots if label]
        desc = self.spec_name + (f" on {','.join(labels)}" if labels else "")
        with progress_bar(len(jobs), desc) as bar:
            workers = [threading.Thread(target=worker, args=(k, env, bar), daemon=True)
                       for k, (_, env) in enumerate(slots)]
            for t in workers:
                t.start()
            try:
                for t in workers:
                    while t.is_alive():
                        t.join(0.5)
            except KeyboardInterrupt:  # the children got Ctrl-C too; let them save their state
                stop.set()
                for t in workers:
                    t.join(20)
                raise
        return result


@LAUNCHERS.register("local")
class LocalLauncher(PoolLauncher):
    """Runs on this machine, each in its own process; ``parallel`` at once with ``threads`` torch threads each.

    ``preload`` (default): each run is a process forked from a server that imported torch and the trainer
    once, which saves seconds per run; ``preload: false`` starts a fresh interpreter for each.
    """

    name = "local"
    OPTIONS = {"parallel": 1, "threads": None, "preload": True}  # threads default: cores / parallel

    def prefix(self) -> list[str] | None:
        return None if self.options["preload"] else module_prefix()

    def threads(self) -> int | None:
        parallel = positive_option(self.name, "parallel", self.options["parallel"])
        threads = self.options["threads"]
        if threads is None and parallel == 1:
            return None  # torch's own default
        return positive_option(self.name, "threads", threads if threads is not None
                             else max(1, (os.cpu_count() or 1) // parallel))

    def slots(self) -> list[tuple[str, dict[str, str]]]:
        parallel = positive_option(self.name, "parallel", self.options["parallel"])
        env = dict(os.environ)
        threads = self.threads()
        if threads is not None:  # a fresh interpreter's torch reads OMP_NUM_THREADS at start-up
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        return [("", env)] * parallel
