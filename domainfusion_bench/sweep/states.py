"""Run states, read from a run dir alone: not launched, running, done, failed (stale counts as failed);
a sweep's status and the removal of its incomplete runs."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from domainfusion_bench import runfiles
from domainfusion_bench.errors import DfbenchError

if TYPE_CHECKING:
    from domainfusion_bench.sweep.jobs import Job
    from domainfusion_bench.sweep.spec import SweepSpec


class State(str, Enum):
    NOT_LAUNCHED = "not launched"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass
class RunState:
    state: State
    reason: str = ""  # failed: the last error line; running: who holds the lock
    stale: bool = False  # done under another configuration: counted failed, rerun by launch


def last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def failure_reason(run_dir: Path) -> str:
    info = runfiles.read_json(run_dir / runfiles.FAILED)
    if info and info.get("error"):
        return str(info["error"]).strip().splitlines()[-1]
    return last_line(run_dir / "err.txt") or last_line(run_dir / runfiles.FAILED)


def run_state(run_dir: Path) -> RunState:
    run_dir = Path(run_dir)
    if (run_dir / runfiles.DONE).exists():
        return RunState(State.DONE)
    info, alive = runfiles.lock_holder(run_dir)
    if alive:
        return RunState(State.RUNNING, f"pid {info.get('pid')} on {info.get('host', '?')}")
    submitted = runfiles.pending_submission(run_dir)
    if submitted is not None:
        return RunState(State.RUNNING, f"queued as Slurm job {submitted.get('job_id') or '?'} (pending)")
    if (run_dir / runfiles.FAILED).exists():
        return RunState(State.FAILED, failure_reason(run_dir) or "failed (no reason recorded)")
    if info is not None:
        where = f"process {info.get('pid', '?')} on {info.get('host', '?')}"
        last = last_line(run_dir / "err.txt")
        return RunState(State.FAILED, f"crashed: {where} is gone" + (f"; last error line: {last}" if last else
                                                                       " (killed, or out of memory?)"))
    if (run_dir / runfiles.RESULTS).exists() or (run_dir / runfiles.RESUME).exists():
        return RunState(State.FAILED, "incomplete: records but no done file and no lock (interrupted)")
    return RunState(State.NOT_LAUNCHED)


def job_states(jobs: Sequence[Job]) -> list[RunState]:
    return [_same_configuration(job, run_state(job.run_dir)) for job in jobs]


def _same_configuration(job: Job, state: RunState) -> RunState:
    """A done run counts as this job's only when its fingerprint is the job's: the run hash covers the
    arguments, the fingerprint also the resolved hyperparameters, so a run made under other defaults (an
    older dfbench) is never taken for done and never mixes into this sweep's tables unannounced."""
    from domainfusion_bench.training import resolve_hparams, run_fingerprint

    if state.state != State.DONE:
        return state
    try:
        runfiles.check_fingerprint(job.run_dir, run_fingerprint(job.args, resolve_hparams(job.args)))
    except DfbenchError as err:
        return RunState(State.FAILED, f"stale: done under another configuration, so not counted for this sweep "
                                      f"nor collected: {err} `sweep launch` reruns it (replacing it); "
                                      "`sweep delete-incomplete` removes it.", stale=True)
    return state


def count_states(states: Sequence[RunState]) -> dict[State, int]:
    counts = {state: 0 for state in State}
    for s in states:
        counts[s.state] += 1
    return counts


STATUS_ORDER = (State.DONE, State.RUNNING, State.FAILED, State.NOT_LAUNCHED)


def format_counts(counts: Mapping[State, int]) -> str:
    return ", ".join(f"{counts[s]} {s.value}" for s in STATUS_ORDER)


def print_status(spec: SweepSpec, jobs: Sequence[Job], states: Sequence[RunState] | None = None,
                 max_failed: int = 20, file=None) -> dict[State, int]:
    file = file or sys.stdout
    states = job_states(jobs) if states is None else states
    counts = count_states(states)
    print(f"sweep {spec.name} ({spec.output_dir}): {len(jobs)} jobs", file=file)
    for s in STATUS_ORDER:
        print(f"  {s.value:<13}{counts[s]:>7}", file=file)
    failed = [(j, s) for j, s in zip(jobs, states) if s.state == State.FAILED]
    if failed:
        print(f"failed runs ({len(failed)}; relaunch resumes them, delete-incomplete removes them):", file=file)
        for job, s in failed[:max_failed]:
            print(f"  {job.run_dir.name}  {job.describe()}\n      {s.reason}", file=file)
        if len(failed) > max_failed:
            print(f"  ... and {len(failed) - max_failed} more", file=file)
    return counts


def delete_incomplete(jobs: Sequence[Job], yes: bool = False, file=None) -> list[Path]:
    """Remove the run dirs of failed/crashed runs and of stale ones (done under another configuration);
    never a running one or one done under this configuration."""
    file = file or sys.stdout
    states = job_states(jobs)
    doomed = [job for job, s in zip(jobs, states) if s.state == State.FAILED]
    if not doomed:
        print("no failed, crashed or stale runs to delete", file=file)
        return []
    n_stale = sum(s.stale for s in states)
    for job in doomed:
        print(f"  {job.run_dir}  {job.describe()}", file=file)
    what = f"{len(doomed)} run dirs" + (f" ({n_stale} of them stale: done under another configuration)"
                                        if n_stale else "")
    if not yes:
        if not sys.stdin.isatty():
            raise DfbenchError(f"{what} would be deleted; pass --yes to confirm")
        if input(f"delete these {what}? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing deleted", file=file)
            return []
    removed = remove_if_failed(doomed)
    print(f"deleted {len(removed)} run dirs", file=file)
    return removed


def remove_if_failed(jobs: Sequence[Job]) -> list[Path]:
    """Remove the run dirs of these jobs that still are failed or stale: one may have been relaunched (or
    finished) since its state was read."""
    removed = []
    for job in jobs:
        if _same_configuration(job, run_state(job.run_dir)).state == State.FAILED:
            shutil.rmtree(job.run_dir, ignore_errors=True)
            removed.append(job.run_dir)
    return removed
