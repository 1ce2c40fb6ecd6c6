"""``results.jsonl``: one record per checkpoint, appended durably and read back fast, torn lines skipped."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from domainfusion_bench.runfiles.files import atomic_write_text
from domainfusion_bench.runfiles.locks import claimed
from domainfusion_bench.runfiles.names import DONE, RESULTS


def append_record(run_dir: Path, record: dict[str, Any]) -> None:
    """One JSON line, keys sorted, flushed to disk before the run goes on (while the claim holds)."""
    line = json.dumps(record, sort_keys=True) + "\n"
    with claimed(run_dir), open(Path(run_dir) / RESULTS, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def write_done(run_dir: Path) -> None:
    """The ``done`` file, last, while the claim holds."""
    with claimed(run_dir):
        atomic_write_text(Path(run_dir) / DONE, "done\n")


try:  # ~5x faster parsing when installed; records with NaN (a diverged loss) fall back to json
    import orjson

    _fast_loads = orjson.loads
except ImportError:  # pragma: no cover
    _fast_loads = json.loads


def loads(data: bytes) -> Any:
    """JSON bytes -> value, with orjson when installed; NaN / Infinity (which orjson refuses) via json."""
    try:
        return _fast_loads(data)
    except ValueError:
        return json.loads(data)


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records of a results.jsonl and the number of lines skipped (truncated or not JSON)."""
    records: list[dict[str, Any]] = []
    skipped = 0
    try:
        with open(path, "rb", buffering=0) as f:
            data = f.readall()
    except FileNotFoundError:
        return records, skipped
    loads, lines = _fast_loads, data.splitlines()
    try:  # the usual file: every line one JSON object, read in one pass (1.8M records in a big sweep)
        records = [loads(line) for line in lines]
    except ValueError:
        records = []
    else:
        if set(map(type, records)) == {dict}:
            return records, 0
        records = []
    for line in lines:
        if not line.strip():
            continue
        try:
            record = loads(line)
        except ValueError:  # orjson.JSONDecodeError and json's are ValueErrors
            try:
                record = json.loads(line)  # NaN / Infinity, which orjson refuses
            except ValueError:  # not JSON, or not UTF-8
                skipped += 1
                continue
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def keep_records_through(run_dir: Path, last_step: int) -> None:
    """On resume: drop records after the resumed checkpoint (and any half-written line)."""
    path = run_dir / RESULTS
    if not path.exists():
        return
    records, _ = read_records(path)
    kept = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= last_step]
    with claimed(run_dir):
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def iter_run_dirs(root: Path) -> Iterator[Path]:
    """Every directory below ``root`` that holds a results.jsonl."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):  # much faster than Path.rglob on 100k run dirs
        dirnames.sort()
        if RESULTS in filenames:
            found.append(Path(dirpath))
    yield from sorted(found)
