"""The ``slurm`` launcher: a submitit job array, one task per run, requeued when pre-empted or timed out."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from domainfusion_bench import runfiles
from domainfusion_bench.launchers.base import (
    LAUNCHERS, Launcher, LaunchResult, Outcome, positive_option, progress_bar, report_outcome,
)
from domainfusion_bench.launchers.child import LAUNCH_LOG, release
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.sweep import Job, failure_reason

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # newline, CR, tab, NUL, ESC, DEL, C1 controls
_SBATCH_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def check_sbatch_value(where: str, value: Any) -> None:
    """A value that becomes part of an ``#SBATCH`` line: one line of plain text, never a second line of the
    job script (which is a shell script: a newline in it would be a command)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DfbenchError(f"{where} must be a string or a number, got {value!r}")
    bad = _CONTROL.search(str(value))
    if bad:
        raise DfbenchError(f"{where} holds a control character ({bad.group()!r}) in {value!r}: it would end the "
                           "#SBATCH line and run the rest as a shell command. Newlines, carriage returns, NUL and "
                           "other control characters are refused; write the value on one line.")


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

    def check(self) -> None:
        o = self.options
        check_sbatch_value("the sweep name (the Slurm job name)", self.spec_name)
        if o["partition"] is not None:
            check_sbatch_value("launcher_options.slurm.partition", o["partition"])
        additional = o["additional"]
        if additional is None:
            return
        if not isinstance(additional, Mapping):
            raise DfbenchError(f"launcher_options.slurm.additional must be a mapping of sbatch option: value, "
                               f"e.g. {{constraint: a100}}; got {additional!r}")
        for key, value in additional.items():
            if not isinstance(key, str) or not _SBATCH_NAME.fullmatch(key):
                raise DfbenchError(f"launcher_options.slurm.additional: {key!r} is not an sbatch option name "
                                   "(letters, digits, - and _, such as constraint or account)")
            check_sbatch_value(f"launcher_options.slurm.additional.{key}", value)

    def launch(self, jobs: Sequence[Job]) -> LaunchResult:
        import submitit

        self.check()

        result = LaunchResult()
        if not jobs:
            return result
        o = self.options
        folder = self.output_dir / ".submitit"
        count = lambda name, least=1: positive_option(self.name, name, o[name], least)  # noqa: E731
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
        with progress_bar(len(jobs), self.spec_name) as bar:
            for s in submitit.helpers.as_completed(submitted, poll_frequency=float(o["poll_s"])):
                job = by_id[s.job_id]
                try:
                    outcome = Outcome.DONE if s.result() == "done" else Outcome.SKIPPED  # or done already / running elsewhere
                except Exception:  # the run's own failure is in its failed file
                    outcome = Outcome.FAILED
                report_outcome(bar, job, outcome, result)
        return result
