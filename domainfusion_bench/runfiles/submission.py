"""``submitted.json``: the Slurm job that will run a run dir, while it is pending."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from domainfusion_bench.runfiles.files import atomic_write_text, read_json
from domainfusion_bench.runfiles.names import SUBMITTED

# A submitted.json this recent marks a run as queued (pending in Slurm): a relaunch does not submit it again.
SUBMITTED_TIMEOUT_S = 48 * 3600


def record_submission(run_dir: Path, job_id: str | None) -> None:
    """The run is queued as Slurm job ``job_id``; ``pending_submission`` reads it back."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(run_dir) / SUBMITTED, json.dumps({"job_id": job_id and str(job_id), "submitted": time.time(),
                                                             "host": socket.gethostname()}))


def pending_submission(run_dir: Path) -> dict[str, Any] | None:
    """The Slurm submission of a run that has not started yet (``submitted.json``, younger than
    ``SUBMITTED_TIMEOUT_S``), or None."""
    path = Path(run_dir) / SUBMITTED
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    if age > SUBMITTED_TIMEOUT_S:
        return None
    return read_json(path) or {"job_id": "?"}
