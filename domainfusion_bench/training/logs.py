"""A run's stdout and stderr copied into its directory (DomainBed's out.txt / err.txt)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

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
