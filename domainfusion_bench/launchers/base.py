"""The launcher registry, the ``Launcher`` base class, and what every launcher shares: outcomes,
the progress bar, option checks."""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.registry import Registry
from domainfusion_bench.sweep import Job, failure_reason


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


def progress_bar(total: int, desc: str) -> tqdm:
    # smoothing=0: the ETA uses the mean time per run so far, steadier than the last few runs
    return tqdm(total=total, desc=desc, unit="run", smoothing=0, dynamic_ncols=True, file=sys.stderr)


def report_outcome(bar: tqdm, job: Job, outcome: Outcome, result: LaunchResult) -> None:
    result.add(job, outcome)
    if outcome == Outcome.FAILED:
        bar.write(f"FAILED {job.run_dir.name}  {job.describe()}\n       {result.failures[-1][1]}", file=sys.stderr)
    bar.update()


def option_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def positive_option(launcher: str, name: str, value: Any, least: int = 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = least - 1
    if number < least or isinstance(value, bool):
        raise DfbenchError(f"launcher {launcher!r}: option {name} must be an integer >= {least}, got {value!r}"
                           + (" (minutes)" if name == "time" else ""))
    return number
