"""Launchers: how a sweep's jobs become processes. One registry; every command is an argument list.

- ``local``: runs in child processes on this machine, one at a time (``parallel: N`` runs N at once,
  each with ``threads`` torch threads).
- ``multi_gpu``: one run per visible GPU at a time, in parallel.
- ``accelerate``: one run after another, each across all GPUs via ``accelerate launch``.
- ``slurm``: a submitit job array (partition, time, gpus, array parallelism); a pre-empted or timed-out
  job is requeued and the run resumes from its checkpoint. ``cluster: local`` runs it with submitit's
  local executor (tests, debugging).
- ``dry_run``: prints the commands, runs nothing.

A failed run never stops the others. Before a run starts, the launcher re-reads its state (another
launcher may have taken it) and holds the run dir's lock itself until the training process writes its
own, so ``status`` shows it running. The child's stderr goes to ``launch_stderr.txt`` in its run dir
(a file, not a pipe: the run survives its launcher); when a child dies without saying why (a signal, an
import error), the launcher writes the ``failed`` file with the exit status and that file's last lines.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from domainfusion_bench import runfiles
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.registry import Registry
from domainfusion_bench.sweep import (
    Job, State, SweepSpec, check_data, count_states, failure_reason, format_counts, job_states, make_jobs,
    module_prefix, run_state,
)

LAUNCH_LOG = "launch_stderr.txt"  # the child's stderr, as the launcher saw it
STDERR_TAIL = 20  # lines of that log kept in a failed file


class Outcome(str, Enum):
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"  # done or running by the time its turn came


@dataclass
class LaunchResult:
    outcomes: dict[Outcome, int] = field(default_factory=lambda: {o: 0 for o in Outcome})
    failures: list[tuple[Job, str]] = field(default_factory=list)

    def add(self, job: Job, outcome: Outcome) -> None:
        self.outcomes[outcome] += 1
        if outcome == Outcome.FAILED:
            self.failures.append((job, failure_reason(job.run_dir)))


# ------------------------------------------------------------------------------- running one job


def claim(job: Job) -> str | None:
    """Take a job whose turn has come: None when it is done or running by now; else lock it for us
    (exclusively) and return the claim's token, which the trainer we start needs to take the run over."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    if run_state(job.run_dir).state in (State.DONE, State.RUNNING):
        return None
    claimed, _ = runfiles.claim(job.run_dir, launcher=True)
    if not claimed:
        return None
    return runfiles.read_json(job.run_dir / runfiles.LOCK).get("token")


def _tail(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def release(run_dir: Path, returncode: int | None) -> Outcome:
    """After the child exits: record why it failed if it could not, and drop a lock nobody holds.
    A lock another live process took meanwhile is theirs: then nothing is written into the run."""
    info, alive = runfiles.lock_holder(run_dir)
    if info is not None and alive and not runfiles.holds_lock(run_dir):
        return Outcome.DONE if (run_dir / runfiles.DONE).exists() else Outcome.SKIPPED
    if info is not None:
        (run_dir / runfiles.LOCK).unlink(missing_ok=True)
    if (run_dir / runfiles.DONE).exists():
        return Outcome.DONE
    if not (run_dir / runfiles.FAILED).exists():
        tail = _tail(run_dir / LAUNCH_LOG, STDERR_TAIL)
        if returncode is not None and returncode < 0:
            try:
                name = signal.Signals(-returncode).name
            except ValueError:
                name = "?"
            error = f"killed by signal {-returncode} ({name}): out of memory, pre-empted or killed by hand?"
        elif returncode == 0:
            error = "the training process exited without writing its done file"
        else:
            lines = [line.strip() for line in tail if line.strip()]
            error = f"exit status {returncode}" + (f": {lines[-1]}" if lines else "")
        runfiles.atomic_write_text(run_dir / runfiles.FAILED,
                                   json.dumps({"error": error, "stderr": "\n".join(tail)}, indent=1))
    return Outcome.FAILED


class _Forked:
    """A job in a process forked from a server that imported the trainer once (``multiprocessing``'s
    forkserver): a run of its own, as with a fresh interpreter, without paying torch's import each time."""

    _context = None

    @classmethod
    def context(cls):
        if cls._context is None:
            import multiprocessing

            cls._context = multiprocessing.get_context("forkserver")
            cls._context.set_forkserver_preload(["domainfusion_bench.sweep", "domainfusion_bench.training", "accelerate"])
        return cls._context

    def __init__(self, args: dict[str, Any], log: Path, threads: int | None, token: str | None = None):
        self.process = self.context().Process(target=_train_in_child, args=(args, str(log), threads, token))
        self.process.start()

    def wait(self, timeout: float | None = None) -> int | None:
        self.process.join(timeout)
        if self.process.exitcode is None and timeout is not None:
            raise subprocess.TimeoutExpired("dfbench train", timeout)
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode


def _train_in_child(args: dict[str, Any], log: str, threads: int | None, token: str | None = None) -> None:
    """The forked child: stderr to the run's launch log, stdout away (the trainer tees both), then train."""
    if token:
        os.environ[runfiles.CLAIM_ENV] = token
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    if threads:
        import torch

        torch.set_num_threads(threads)
    from domainfusion_bench.training import TrainArgs, train

    try:  # what `dfbench train` does with an error; launchers do not import the CLI
        train(TrainArgs(**args))
    except DfbenchError as err:
        print(f"dfbench train: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("dfbench train: interrupted", file=sys.stderr)
        sys.exit(130)


def run_job(job: Job, prefix: Sequence[str] | None, env: dict[str, str] | None = None,
            threads: int | None = None) -> Outcome:
    """Run one job to its end in a child process (the trainer writes out.txt/err.txt itself).

    ``prefix`` None: fork it from the preloaded server (``threads`` torch threads); else run ``prefix +
    train argv`` as a fresh process with ``env``.
    """
    token = claim(job)
    if token is None:
        return Outcome.SKIPPED
    with open(job.run_dir / LAUNCH_LOG, "a") as log:
        if prefix is None:
            proc = _Forked(dataclasses.asdict(job.args), job.run_dir / LAUNCH_LOG, threads, token)
        else:
            proc = subprocess.Popen(job.command(prefix), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=log, env={**(os.environ if env is None else env), runfiles.CLAIM_ENV: token})
        try:
            proc.wait()
        except BaseException:  # Ctrl-C reached the child too: give it time to save its failure, then stop it
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            release(job.run_dir, proc.returncode)
            raise
    return release(job.run_dir, proc.returncode)


def _progress(total: int, desc: str) -> tqdm:
    # smoothing=0: the ETA uses the mean time per run so far, steadier than the last few runs
    return tqdm(total=total, desc=desc, unit="run", smoothing=0, dynamic_ncols=True, file=sys.stderr)


def _report(bar: tqdm, job: Job, outcome: Outcome, result: LaunchResult) -> None:
    result.add(job, outcome)
    if outcome == Outcome.FAILED:
        bar.write(f"FAILED {job.run_dir.name}  {job.describe()}\n       {result.failures[-1][1]}", file=sys.stderr)
    bar.update()


def _option_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def visible_gpus() -> list[str]:
    """CUDA device ids this process may use: $CUDA_VISIBLE_DEVICES, else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return _option_list(env)
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _positive_int(launcher: str, name: str, value: Any, least: int = 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = least - 1
    if number < least or isinstance(value, bool):
        raise DfbenchError(f"launcher {launcher!r}: option {name} must be an integer >= {least}, got {value!r}"
                           + (" (minutes)" if name == "time" else ""))
    return number


# ---------------------------------------------------------------------------------- the launchers


class Launcher:
    """Runs a list of jobs. ``OPTIONS`` are its settings with defaults (spec ``launcher_options``, CLI -O)."""

    OPTIONS: dict[str, Any] = {}
    name = "launcher"

    def __init__(self, output_dir: str | Path = "results", spec_name: str = "sweep", **options: Any):
        unknown = [k for k in options if k not in self.OPTIONS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], self.OPTIONS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            known = ", ".join(self.OPTIONS) or "none"
            raise DfbenchError(f"launcher {self.name!r} has no option {unknown[0]!r}.{hint} Its options: {known}.")
        self.output_dir = Path(output_dir)
        self.spec_name = spec_name
        self.options = {**self.OPTIONS, **options}

    def check(self) -> None:
        """Raise a DfbenchError for a bad option before anything is printed or launched."""

    def launch(self, jobs: Sequence[Job]) -> LaunchResult:
        raise NotImplementedError


LAUNCHERS: Registry[type[Launcher]] = Registry("launcher")


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
                    _report(bar, job, outcome, result)

        labels = [label for label, _ in slots if label]
        desc = self.spec_name + (f" on {','.join(labels)}" if labels else "")
        with _progress(len(jobs), desc) as bar:
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
        parallel = _positive_int(self.name, "parallel", self.options["parallel"])
        threads = self.options["threads"]
        if threads is None and parallel == 1:
            return None  # torch's own default
        return _positive_int(self.name, "threads", threads if threads is not None
                             else max(1, (os.cpu_count() or 1) // parallel))

    def slots(self) -> list[tuple[str, dict[str, str]]]:
        parallel = _positive_int(self.name, "parallel", self.options["parallel"])
        env = dict(os.environ)
        threads = self.threads()
        if threads is not None:  # a fresh interpreter's torch reads OMP_NUM_THREADS at start-up
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        return [("", env)] * parallel


@LAUNCHERS.register("accelerate")
class AccelerateLauncher(PoolLauncher):
    """One run after another, each across all GPUs (``accelerate launch``, one process per GPU)."""

    name = "accelerate"
    OPTIONS = {"gpus": None, "main_process_port": None}  # gpus: processes per run (default: all visible)

    def prefix(self) -> list[str]:
        n = _positive_int(self.name, "gpus", self.options["gpus"]) if self.options["gpus"] is not None \
            else len(visible_gpus())
        if n < 1:
            raise DfbenchError("the accelerate launcher found no GPU; use --launcher local on a CPU machine")
        # The trainer picks its own precision (bf16 on CUDA); launch's flags only silence its defaults.
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n),
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if n > 1:
            prefix.append("--multi_gpu")
        if self.options["main_process_port"] is not None:
            prefix += ["--main_process_port", str(self.options["main_process_port"])]
        return [*prefix, "-m", "domainfusion_bench"]


@LAUNCHERS.register("multi_gpu")
class MultiGPULauncher(PoolLauncher):
    """Runs in parallel, one per GPU (``CUDA_VISIBLE_DEVICES`` set per child)."""

    name = "multi_gpu"
    OPTIONS = {"gpus": None}  # device ids, e.g. "0,1,3" (default: every visible GPU)

    def slots(self) -> list[tuple[str, dict[str, str]]]:
        gpus = _option_list(self.options["gpus"]) or visible_gpus()
        if not gpus:
            raise DfbenchError("the multi_gpu launcher found no GPU; use --launcher local, or -O gpus=0,1")
        return [(f"GPU {gpu}", {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}) for gpu in gpus]


class SubmititRun:
    """What a Slurm job runs: the training command in a child process, with a heartbeat on its lock.

    ``checkpoint`` is submitit's pre-emption/timeout hook: it requeues this same run, which resumes from
    its last ``resume.pt``.
    """

    def __init__(self, command: list[str], run_dir: str, heartbeat_s: float = 60.0, requeued: bool = False):
        self.command, self.run_dir, self.heartbeat_s, self.requeued = command, run_dir, heartbeat_s, requeued

    def __call__(self) -> str:
        run_dir = Path(self.run_dir)
        (run_dir / runfiles.SUBMITTED).unlink(missing_ok=True)  # started: no longer pending in the queue
        if (run_dir / runfiles.DONE).exists():
            return "done already"
        # A requeued job may find its own earlier attempt's lock, still fresh: that one is gone.
        if runfiles.lock_holder(run_dir)[1] and not self.requeued:
            return "running elsewhere"
        run_dir.mkdir(parents=True, exist_ok=True)
        # a requeued job's claim replaces its earlier attempt's lock (maybe on another node, still fresh)
        claimed, holder = runfiles.claim(run_dir, launcher=True, force=self.requeued)
        if not claimed:
            return "running elsewhere"
        (run_dir / runfiles.SUBMITTED).unlink(missing_ok=True)  # the launcher may have just written the job id
        token = runfiles.read_json(run_dir / runfiles.LOCK).get("token")
        with open(run_dir / LAUNCH_LOG, "a") as log:
            proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                    env={**os.environ, runfiles.CLAIM_ENV: token})
            while proc.poll() is None:
                try:  # status on another host reads this mtime as "still alive"
                    os.utime(run_dir / runfiles.LOCK)
                except OSError:
                    pass
                try:
                    proc.wait(timeout=self.heartbeat_s)
                except subprocess.TimeoutExpired:
                    pass
        if release(run_dir, proc.returncode) != Outcome.DONE:
            raise RuntimeError(failure_reason(run_dir))
        return "done"

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(SubmititRun(self.command, self.run_dir, self.heartbeat_s, True))


@LAUNCHERS.register("slurm")
class SlurmLauncher(Launcher):
    """A submitit job array, one task per run; waits for the array with a progress bar."""

    name = "slurm"
    OPTIONS = {
        "partition": None,
        "time": 24 * 60,  # minutes per run
        "gpus": 1,  # per run
        "cpus_per_task": 8,
        "mem_gb": None,
        "array_parallelism": 64,  # runs at once
        "max_requeue": 3,  # requeues after time-outs (pre-emptions are always requeued)
        "cluster": None,  # None: submitit's choice (slurm when sbatch exists); "local" for tests
        "poll_s": 30.0,
        "heartbeat_s": 60.0,
        "additional": None,  # extra sbatch parameters, e.g. {"constraint": "a100", "account": "lab"}
    }

    def launch(self, jobs: Sequence[Job]) -> LaunchResult:
        import submitit

        result = LaunchResult()
        if not jobs:
            return result
        o = self.options
        folder = self.output_dir / ".submitit"
        count = lambda name, least=1: _positive_int(self.name, name, o[name], least)  # noqa: E731
        requeues = count("max_requeue", 0)
        executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=o["cluster"],
                                         slurm_max_num_timeout=requeues, local_max_num_timeout=requeues)
        params = dict(
            name=f"dfbench-{self.spec_name}", timeout_min=count("time"), gpus_per_node=count("gpus", 0),
            cpus_per_task=count("cpus_per_task"), slurm_array_parallelism=count("array_parallelism"),
        )
        if o["mem_gb"] is not None:
            params["mem_gb"] = count("mem_gb")
        if o["partition"]:
            params["slurm_partition"] = o["partition"]
        if o["additional"]:
            params["slurm_additional_parameters"] = dict(o["additional"])
        executor.update_parameters(**params)
        runs = [SubmititRun(job.command(), str(job.run_dir), float(o["heartbeat_s"])) for job in jobs]
        submit_time = time.time()
        for job in jobs:  # marked before submitting: a relaunch while they are pending does not submit them again
            runfiles.record_submission(job.run_dir, None)
        try:
            submitted = executor.submit_array(runs)
        except BaseException:
            for job in jobs:
                (job.run_dir / runfiles.SUBMITTED).unlink(missing_ok=True)
            raise
        by_id = {s.job_id: job for s, job in zip(submitted, jobs)}
        for s, job in zip(submitted, jobs):  # the job id, for status; a run that already started removed its mark
            if (job.run_dir / runfiles.SUBMITTED).exists():
                runfiles.record_submission(job.run_dir, s.job_id)
                failed = job.run_dir / runfiles.FAILED
                if ((job.run_dir / runfiles.LOCK).exists() or (job.run_dir / runfiles.DONE).exists()
                        or (failed.exists() and failed.stat().st_mtime >= submit_time)):  # it started meanwhile
                    (job.run_dir / runfiles.SUBMITTED).unlink(missing_ok=True)
        print(f"submitted {len(submitted)} runs as {submitted[0].job_id.split('_')[0]} (logs in {folder})",
              file=sys.stderr)
        with _progress(len(jobs), self.spec_name) as bar:
            for s in submitit.helpers.as_completed(submitted, poll_frequency=float(o["poll_s"])):
                job = by_id[s.job_id]
                try:
                    outcome = Outcome.DONE if s.result() == "done" else Outcome.SKIPPED  # or done already / running elsewhere
                except Exception:  # the run's own failure is in its failed file
                    outcome = Outcome.FAILED
                _report(bar, job, outcome, result)
        return result


@LAUNCHERS.register("dry_run")
class DryRunLauncher(Launcher):
    """Prints each job's argument list (shell-quoted, one per line) and runs nothing."""

    name = "dry_run"
    OPTIONS = {"prefix": "python"}  # python: the module under this interpreter; dfbench: the console script

    def launch(self, jobs: Sequence[Job]) -> LaunchResult:
        prefix = ["dfbench"] if self.options["prefix"] == "dfbench" else None
        for job in jobs:
            print(shlex.join(job.command(prefix)))
        return LaunchResult()


# ---------------------------------------------------------------------------------- a whole sweep


def make_launcher(spec: SweepSpec, name: str | None = None, options: dict[str, Any] | None = None) -> Launcher:
    name = name or spec.launcher
    cls = LAUNCHERS.get(name)
    merged = {**spec.launcher_options.get(name, {}), **(options or {})}
    return cls(output_dir=spec.output_dir, spec_name=spec.name, **merged)


def launch_sweep(spec: SweepSpec, launcher: str | None = None, options: dict[str, Any] | None = None) -> LaunchResult:
    """Run every job that is not done and not running; failed and interrupted ones resume."""
    runner = make_launcher(spec, launcher, options)
    runner.check()
    jobs = make_jobs(spec)
    states = job_states(jobs)
    todo = [job for job, s in zip(jobs, states) if s.state not in (State.DONE, State.RUNNING)]
    counts = count_states(states)
    dry = isinstance(runner, DryRunLauncher)
    print(f"sweep {spec.name}: {len(jobs)} jobs ({format_counts(counts)}); "
          f"{len(todo)} to run with {runner.name}" + (f", {counts[State.FAILED]} of them resume or retry"
                                                     if counts[State.FAILED] else ""), file=sys.stderr)
    if todo and not dry:
        check_data(spec)
    result = runner.launch(todo)
    if not dry:
        print(f"sweep {spec.name}: {format_counts(count_states(job_states(jobs)))}", file=sys.stderr)
    return result
