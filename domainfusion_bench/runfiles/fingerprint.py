"""``fingerprint.json``: the arguments that define a run; a run dir never mixes two configurations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.runfiles.files import atomic_write_text, read_json
from domainfusion_bench.runfiles.names import FINGERPRINT, RESULTS
from domainfusion_bench.runfiles.records import read_records


def check_fingerprint(run_dir: Path, fingerprint: Mapping[str, Any]) -> None:
    """Refuse a run dir that belongs to another configuration, naming what differs.

    A dir without ``fingerprint.json`` (written by an older dfbench) is checked against the ``args`` and
    ``hparams`` of its records, when it has any.
    """
    run_dir = Path(run_dir)
    ours = json.loads(json.dumps(fingerprint))
    theirs = read_json(run_dir / FINGERPRINT)
    source = run_dir / FINGERPRINT
    if theirs is None and (run_dir / FINGERPRINT).exists():
        raise DfbenchError(f"{source} is unreadable: this run dir's configuration is unknown. Train into "
                           "another --output_dir, or delete that run dir.")
    if theirs is None:
        records, _ = read_records(run_dir / RESULTS)
        record = next((r for r in records if isinstance(r.get("args"), dict)), None)
        if record is None:
            return
        theirs = {k: v for k, v in record["args"].items() if k in ours}
        if "hparams_resolved" in ours and isinstance(record.get("hparams"), dict):
            theirs["hparams_resolved"] = record["hparams"]
        ours = {k: v for k, v in ours.items() if k in theirs}
        source = run_dir / RESULTS
    differs = sorted(k for k in set(ours) | set(theirs) if ours.get(k, "<missing>") != theirs.get(k, "<missing>"))
    if differs:
        shown = "; ".join(f"{k}: {theirs.get(k, '<missing>')!r} there, {ours.get(k, '<missing>')!r} now"
                          for k in differs[:6])
        raise DfbenchError(f"{run_dir} holds another configuration ({shown}; from {source.name}). It is not "
                           "resumed: train into another --output_dir (the default is unique per configuration).")


def write_fingerprint(run_dir: Path, fingerprint: Mapping[str, Any]) -> None:
    atomic_write_text(Path(run_dir) / FINGERPRINT, json.dumps(fingerprint, sort_keys=True, indent=1))
