"""``splits.json``: a run's exact in/out indices, in one content-addressed file shared by the runs beside it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.runfiles.files import atomic_write_text, read_json
from domainfusion_bench.runfiles.locks import check_claim, claimed
from domainfusion_bench.runfiles.names import SHARED_SPLITS, SPLITS


def write_splits(run_dir: Path, index_record: Mapping[str, Any], key: str) -> Path:
    """Store a run's in/out indices once per (dataset, trial seed, holdout) for all the runs beside it
    (``<parent>/.splits/<key>-<sha>.json``, content-addressed: 4.7 MB per DomainNet run otherwise); the
    run's ``splits.json`` keeps the domain names and sizes, the shared file's path and its sha256."""
    run_dir = Path(run_dir)
    check_claim(run_dir)
    text = json.dumps(index_record, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)[:100]
    shared = run_dir.parent / SHARED_SPLITS / f"{safe}-{digest[:16]}.json"
    if not shared.exists():
        shared.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(shared, text)
    summary: dict[str, Any] = {
        name: {"domain": env.get("domain"), "n_in": len(env.get("in", ())), "n_out": len(env.get("out", ()))}
        for name, env in index_record.items()
    }
    summary.update(indices=os.path.relpath(shared, run_dir), sha256=digest)
    with claimed(run_dir):
        atomic_write_text(run_dir / SPLITS, json.dumps(summary, sort_keys=True))
    return shared


def read_splits(run_dir: Path) -> dict[str, Any] | None:
    """A run's full index record (env name -> domain, in, out), from the shared file when it has one."""
    data = read_json(Path(run_dir) / SPLITS)
    if not isinstance(data, dict) or "indices" not in data:
        return data
    path = Path(run_dir) / data["indices"]
    try:
        text = path.read_text()
    except OSError:
        raise DfbenchError(f"{Path(run_dir) / SPLITS} points to {path}, which cannot be read") from None
    if hashlib.sha256(text.encode()).hexdigest() != data.get("sha256"):
        raise DfbenchError(f"{path} does not match the sha256 recorded in {Path(run_dir) / SPLITS}")
    return json.loads(text)
