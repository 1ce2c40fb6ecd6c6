"""The files of a run directory, written so that a crash never leaves a half-truth behind.

``results.jsonl`` one record per checkpoint; ``done`` written last and atomically; ``failed`` holds the
reason a run crashed; ``lock`` says which process runs it (and its heartbeat); ``resume.pt`` the state
a relaunch continues from; ``splits.json`` the exact in/out indices of every domain.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

RESULTS = "results.jsonl"
DONE = "done"
FAILED = "failed"
LOCK = "lock"
# A lock written on another host counts as held while its heartbeat (mtime) is this recent.
HEARTBEAT_TIMEOUT_S = 15 * 60
RESUME = "resume.pt"
SPLITS = "splits.json"
MODEL = "model.pkl"
PREVIEWS = "previews"  # a few generated images per stage and domain (generative methods)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_record(run_dir: Path, record: dict[str, Any]) -> None:
    """One JSON line, keys sorted, flushed to disk before the run goes on."""
    with open(run_dir / RESULTS, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records of a results.jsonl and the number of lines skipped (truncated or not JSON)."""
    records, skipped = [], 0
    if not path.exists():
        return records, skipped
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
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
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def write_lock(run_dir: Path, **extra: Any) -> None:
    """Who holds the run: pid, host, start time (``launcher=True``: a claim the trainer takes over)."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), **extra}
    atomic_write_text(run_dir / LOCK, json.dumps(info))


def pid_alive(pid: int, since: float | None = None) -> bool:
    """Is ``pid`` a live (non-zombie) process on this host, started no later than ``since``?"""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    stat = Path(f"/proc/{pid}/stat")
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True  # not Linux, or it just ended: os.kill said alive
    if fields[0] in ("Z", "X"):  # zombie or dead: killed, not yet reaped
        return False
    if since is not None:  # pid reused by a process that started after the lock was written
        try:
            boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
            started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
            if started > since + 2.0:
                return False
        except (OSError, StopIteration, ValueError, IndexError):
            pass
    return True


def lock_holder(run_dir: Path) -> tuple[dict[str, Any] | None, bool]:
    """(lock info, alive) of a run dir's lock; (None, False) when there is no lock."""
    lock = Path(run_dir) / LOCK
    try:
        mtime = lock.stat().st_mtime
    except FileNotFoundError:
        return None, False
    info = read_json(lock) or {}
    if info.get("host", socket.gethostname()) == socket.gethostname():
        alive = pid_alive(info.get("pid", -1), info.get("started"))
    else:
        alive = time.time() - mtime < HEARTBEAT_TIMEOUT_S
    return info, alive


def heartbeat(run_dir: Path) -> None:
    lock = run_dir / LOCK
    if lock.exists():
        os.utime(lock)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # ValueError: not JSON, or not text at all
        return None


def iter_run_dirs(root: Path) -> Iterator[Path]:
    """Every directory below ``root`` that holds a results.jsonl."""
    for path in sorted(Path(root).rglob(RESULTS)):
        yield path.parent
