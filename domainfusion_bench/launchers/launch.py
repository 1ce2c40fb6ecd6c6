"""A whole sweep: pick its launcher, run every job that is neither done nor running, report the counts."""

from __future__ import annotations

import sys
from typing import Any

from domainfusion_bench.launchers.base import LAUNCHERS, Launcher, LaunchResult
from domainfusion_bench.launchers.dry_run import DryRunLauncher
from domainfusion_bench.sweep import (
    State, SweepSpec, check_data, count_states, format_counts, job_states, make_jobs, remove_if_failed,
    with_plugins,
)


def make_launcher(spec: SweepSpec, name: str | None = None, options: dict[str, Any] | None = None) -> Launcher:
    name = name or spec.launcher
    cls = LAUNCHERS.get(name)
    merged = {**spec.launcher_options.get(name, {}), **(options or {})}
    return cls(output_dir=spec.output_dir, spec_name=spec.name, **merged)


def launch_sweep(spec: SweepSpec, launcher: str | None = None, options: dict[str, Any] | None = None) -> LaunchResult:
    """Run every job that is not done and not running; failed and interrupted ones resume."""
    runner = make_launcher(spec, launcher, options)
    runner.check()
    dry = isinstance(runner, DryRunLauncher)
    if not dry:  # a spec's plugins are code: they run when the sweep is launched, not when it is listed
        spec = with_plugins(spec)
    jobs = make_jobs(spec)
    states = job_states(jobs)
    todo = [job for job, s in zip(jobs, states) if s.state not in (State.DONE, State.RUNNING)]
    counts = count_states(states)
    print(f"sweep {spec.name}: {len(jobs)} jobs ({format_counts(counts)}); "
          f"{len(todo)} to run with {runner.name}" + (f", {counts[State.FAILED]} of them resume or retry"
                                                     if counts[State.FAILED] else ""), file=sys.stderr)
    if todo and not dry:
        check_data(spec)
        stale = [job for job, s in zip(jobs, states) if s.stale]
        if stale:  # a run dir holds one configuration: the stale one makes way for this sweep's
            removed = remove_if_failed(stale)
            print(f"sweep {spec.name}: {len(removed)} stale run(s), done under another configuration, are rerun; "
                  "their old run dirs are removed", file=sys.stderr)
    result = runner.launch(todo)
    if not dry:
        print(f"sweep {spec.name}: {format_counts(count_states(job_states(jobs)))}", file=sys.stderr)
    return result
