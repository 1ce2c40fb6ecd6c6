"""``lock``: which process runs a run dir, claimed exclusively (also across hosts on NFS), kept alive
by a heartbeat, and judged alive or dead by others; a trainer's writes go through ``claimed``, so one that
lost its claim (another process took the run over) writes nothing more."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.runfiles.files import atomic_write_text, read_json
from domainfusion_bench.runfiles.names import CLAIM_MUTEX, LOCK

# A lock written on another host counts as held while its heartbeat (mtime) is this recent.
HEARTBEAT_TIMEOUT_S = 15 * 60
# The trainer refreshes its lock's mtime this often from a background thread, long stages included.
HEARTBEAT_INTERVAL_S = 60.0
CLAIM_MUTEX_STALE_S = 30.0
CLAIM_ENV = "DFBENCH_CLAIM"  # token of the launcher's claim, handed to the trainer it starts
_CLAIMS: dict[str, str] = {}  # run dir -> id of the claim this process trains it under
_LOST: set[str] = set()  # run dirs whose claim this process lost


class LostClaim(DfbenchError):
    """Another process took over a run this process was training: this one must write nothing more."""


def _key(run_dir: Path) -> str:
    return os.path.abspath(run_dir)


def write_lock(run_dir: Path, **extra: Any) -> None:
    """Who holds the run: pid, host, start time (``launcher=True``: a claim the trainer takes over)."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), **extra}
    atomic_write_text(run_dir / LOCK, json.dumps(info))


@contextlib.contextmanager
def _claim_mutex(run_dir: Path, timeout_s: float = 20.0) -> Iterator[None]:
    """A tiny critical section around reading and writing the lock: O_EXCL creation is atomic on local
    disks and on NFS, so two hosts never both believe they claimed a run. A mutex file older than
    ``CLAIM_MUTEX_STALE_S`` was left by a killed process and is broken."""
    path = Path(run_dir) / CLAIM_MUTEX
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            break
        except FileExistsError:
            try:
                if time.time() - path.stat().st_mtime > CLAIM_MUTEX_STALE_S:
                    path.unlink(missing_ok=True)
                    continue
            except FileNotFoundError:
                continue
            if time.monotonic() > deadline:
                raise DfbenchError(f"could not claim {run_dir}: {path} stays held by another process; if none is "
                                   "claiming this run, delete that file") from None
            time.sleep(0.02)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _mine(info: Mapping[str, Any] | None) -> bool:
    return bool(info) and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname()


def claim(run_dir: Path, launcher: bool = False, token: str | None = None, force: bool = False
          ) -> tuple[bool, dict[str, Any] | None]:
    """Take the run's lock, exclusively: (True, previous holder) or (False, the live holder).

    A live holder is respected unless it is this process, or a launcher's claim whose token we were
    handed (``$DFBENCH_CLAIM``: the launcher started us), or ``force`` (a requeued Slurm job replacing its
    own earlier attempt). A launcher claim gets a fresh token, returned in the lock as ``token``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with _claim_mutex(run_dir):
        info, alive = lock_holder(run_dir)
        if alive and not force and not _mine(info):
            if not (info.get("launcher") and token and info.get("token") == token):
                return False, info
        extra: dict[str, Any] = {"launcher": True, "token": uuid.uuid4().hex} if launcher else {}
        claim_id = uuid.uuid4().hex  # tells this claim from a later one of the same pid (a requeue, pid reuse)
        write_lock(run_dir, claim_id=claim_id, **extra)
        if not launcher:
            _CLAIMS[_key(run_dir)] = claim_id
            _LOST.discard(_key(run_dir))
        return True, info


def holds_lock(run_dir: Path) -> bool:
    """Whether this process holds the run's lock (and may write ``failed`` or remove the lock)."""
    info, ours = read_json(Path(run_dir) / LOCK), _CLAIMS.get(_key(run_dir))
    return _mine(info) and (ours is None or info.get("claim_id") == ours)


def release_lock(run_dir: Path) -> None:
    """Remove the lock if it is ours; another process's lock is never touched."""
    with _claim_mutex(run_dir):
        if holds_lock(run_dir):
            (Path(run_dir) / LOCK).unlink(missing_ok=True)
    _CLAIMS.pop(_key(run_dir), None)


def claim_lost(run_dir: Path) -> bool:
    """Whether this process found that it lost its claim on the run (cheap: no file is read)."""
    return _key(run_dir) in _LOST


def check_claim(run_dir: Path) -> None:
    """Raise ``LostClaim`` when this process claimed the run to train it and the lock now is another's.
    A run dir this process never claimed (a tool, a test writing files) is not checked."""
    key = _key(run_dir)
    ours = _CLAIMS.get(key)
    if ours is None:
        return
    info = read_json(Path(run_dir) / LOCK)
    if key in _LOST or not info or info.get("claim_id") != ours:
        _LOST.add(key)
        who = f"process {info.get('pid', '?')} on {info.get('host', '?')}" if info else "nobody (it was removed)"
        raise LostClaim(f"{run_dir} was taken over while this process trained it (its lock now names {who}: our "
                        "heartbeat looked stale to it, or the run was requeued); this process stops and writes "
                        "nothing more into the run, which the other one carries on")


@contextlib.contextmanager
def claimed(run_dir: Path) -> Iterator[None]:
    """Around a write into a run: the claim is checked inside the claim mutex, so no other process can
    take the run over between the check and the write."""
    if _key(run_dir) not in _CLAIMS:
        yield
        return
    with _claim_mutex(run_dir):
        check_claim(run_dir)
        yield


class Heartbeat:
    """Refreshes the lock's mtime every ``interval`` seconds from a daemon thread, so a run in a long
    stage (generation, helper-model training, a slow evaluation) still reads as alive on other hosts."""

    def __init__(self, run_dir: Path, interval: float | None = None):
        self.run_dir, self.interval = Path(run_dir), interval or HEARTBEAT_INTERVAL_S
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="dfbench-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if holds_lock(self.run_dir):
                    os.utime(self.run_dir / LOCK)
                elif _key(self.run_dir) in _CLAIMS:  # taken over: the next write ends the run
                    _LOST.add(_key(self.run_dir))
                    return
            except OSError:
                pass

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


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
    """Refresh the lock's mtime (the run is alive); a trainer that lost its claim stops here."""
    check_claim(run_dir)
    lock = Path(run_dir) / LOCK
    if lock.exists():
        os.utime(lock)
