"""Running one job: claim its run dir, start the trainer in a child process (forked from a preloaded
server, or a fresh interpreter), wait, and record why it failed when the child could not."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from domainfusion_bench import runfiles
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.launchers.base import Outcome
from domainfusion_bench.sweep import Job, State, run_state

LAUNCH_LOG = "launch_stderr.txt"  # the child's stderr, as the launcher saw it
STDERR_TAIL = 20  # lines of that log kept in a failed file


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
