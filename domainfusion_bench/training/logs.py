"""A run's logs: stdout and stderr copied into its directory (DomainBed's out.txt / err.txt), and the
experiment trackers of ``--log_with`` (accelerate's: TensorBoard, W&B, MLflow, Aim)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from domainfusion_bench.errors import DfbenchError

from domainfusion_bench import runfiles


class _Tee:
    """Copies a stream to a log file in the run directory (DomainBed's out.txt / err.txt)."""

    def __init__(self, stream, path: Path):
        self.stream, self.file, self.run_dir = stream, open(path, "a"), path.parent

    def write(self, text: str) -> int:
        if not runfiles.claim_lost(self.run_dir):  # the run's new owner logs there now
            self.file.write(text)
            self.file.flush()
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def _logs_to(run_dir: Path, enabled: bool):
    if not enabled:
        yield
        return
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(out, run_dir / "out.txt"), _Tee(err, run_dir / "err.txt")
    try:
        yield
    finally:
        sys.stdout.file.close(), sys.stderr.file.close()
        sys.stdout, sys.stderr = out, err


# --log_with name -> the pip package accelerate's tracker needs
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "aim": "aim"}
TRACKER_PROJECT = "trackers"  # accelerate's project name: tensorboard writes <run dir>/trackers/


def tracker_names(log_with: str | None) -> list[str]:
    """``--log_with`` as accelerate's tracker names, each checked to be installed (accelerate itself would
    drop a missing one without a word)."""
    import importlib.util

    names = [t.strip() for t in (log_with or "").split(",") if t.strip()]
    for name in names:
        if name not in TRACKER_PACKAGES:
            raise DfbenchError(f"--log_with {name!r} is not a tracker here; choose from {', '.join(TRACKER_PACKAGES)}")
        package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise DfbenchError(f"--log_with {name} needs the {package} package: pip install {package} "
                               "(or pip install 'domainfusion_bench[trackers]')")
    return names


def _plain(value: Any) -> Any:
    """A tracker config value: numbers, strings and bools as they are, anything else as JSON text."""
    return value if isinstance(value, (int, float, str, bool)) else json.dumps(value, sort_keys=True, default=str)


class Trackers:
    """accelerate's experiment trackers for one run: every record's numbers at its step, files in the run
    dir (wandb offline unless WANDB_MODE says otherwise). Only the main process logs."""

    def __init__(self, accelerator, run_dir: Path, args: Any, hparams: dict[str, Any], is_main: bool):
        self.accelerator = accelerator
        self.on = bool(getattr(accelerator, "log_with", None)) and is_main
        if not self.on:
            return
        os.environ.setdefault("WANDB_MODE", "offline")  # no account, no network: files in the run dir
        config = {**{f"args/{k}": _plain(v) for k, v in dataclasses.asdict(args).items()},
                  **{f"hparams/{k}": _plain(v) for k, v in hparams.items()}}
        accelerator.init_trackers(TRACKER_PROJECT, config=config,
                                  init_kwargs={"wandb": {"dir": str(run_dir), "name": run_dir.name}})

    def log(self, record: dict[str, Any]) -> None:
        if self.on:
            numbers = {k: v for k, v in record.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
            self.accelerator.log(numbers, step=int(record["step"]))

    def end(self) -> None:
        if self.on:
            self.accelerator.end_training()
            self.on = False
