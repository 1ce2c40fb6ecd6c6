"""The ``dry_run`` launcher: prints the commands, runs nothing."""

from __future__ import annotations

import shlex
from typing import Sequence

from domainfusion_bench.launchers.base import LAUNCHERS, Launcher, LaunchResult
from domainfusion_bench.sweep import Job


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
