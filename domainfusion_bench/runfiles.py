"""The files of a run directory, written so that a crash never leaves a half-truth behind.

``results.jsonl`` one record per checkpoint; ``done`` written last and atomically; ``failed`` holds the
reason a run crashed; ``lock`` says which process runs it (and its heartbeat); ``resume.pt`` the state
a relaunch continues from; ``splits.json`` the exact in/out indices of every domain; ``fingerprint.json``
the arguments that define the run (a directory never mixes two configurations); ``submitted.json`` the
Slurm job that will run it, while that job is pending.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

from domainfusion_bench.errors import DfbenchError

RESULTS = "results.jsonl"
DONE = "done"
FAILED = "failed"
LOCK = "lock"
# A lock written on another host counts as held while its heartbeat (mtime) is this recent.
HEARTBEAT_TIMEOUT_S = 15 * 60
# The trainer refreshes its lock's mtime this often from a background thread, long stages included.
HEARTBEAT_INTERVAL_S = 60.0
RESUME = "resume.pt"
SPLITS = "splits.json"
MODEL = "model.pkl"
PREVIEWS = "previews"  # a few generated images per stage and domain (generative methods)
FINGERPRINT = "fingerprint.json"
SHARED_SPLITS = ".splits"  # next to the run dirs: one index file per (dataset, trial, holdout), shared
SUBMITTED = "submitted.json"
# A submitted.json this recent marks a run as queued (pending in Slurm): a relaunch does not submit it again.
SUBMITTED_TIMEOUT_S = 48 * 3600
CLAIM_MUTEX = ".lock.claim"  # created with O_EXCL around check-and-write of the lock (NFS-safe)
CLAIM_MUTEX_STALE_S = 30.0
CLAIM_ENV = "DFBENCH_CLAIM"  # token of the launcher's claim, handed to the trainer it starts


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
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


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
        write_lock(run_dir, **extra)
        return True, info


def holds_lock(run_dir: Path) -> bool:
    """Whether this process holds the run's lock (and may write ``failed`` or remove the lock)."""
    return _mine(read_json(Path(run_dir) / LOCK))


def release_lock(run_dir: Path) -> None:
    """Remove the lock if it is ours; another process's lock is never touched."""
    with _claim_mutex(run_dir):
        if holds_lock(run_dir):
            (Path(run_dir) / LOCK).unlink(missing_ok=True)


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
            except OSError:
                pass

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


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


def save_resume(path: Path, state: Mapping[str, Any]) -> None:
    """Write a resume point atomically and durably: temp file, fsync, rename, fsync of the directory.

    ``state`` holds tensors, numbers, strings, bools, None, lists, tuples and dicts only, so that
    ``load_resume`` can read it with ``weights_only=True`` (no arbitrary unpickling).
    """
    import torch

    _check_plain(state, "state")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(dict(state), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _check_plain(value: Any, where: str) -> None:
    """Fail at save time, naming the key, when a resume point holds something ``weights_only`` cannot load
    (numpy arrays, custom objects): found only at the next load, it would cost the run its progress."""
    import torch

    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.Size, torch.dtype)):
        return
    if isinstance(value, (list, tuple)):
        for k, item in enumerate(value):
            _check_plain(item, f"{where}[{k}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"resume point: key {key!r} of {where} is a {type(key).__name__}; use str or int")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"resume point: {where} is a {type(value).__module__}.{type(value).__name__}; resume state holds "
                    "only tensors, numbers, strings, bools, None, lists and dicts (convert it in extra_state)")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_resume(path: Path, map_location: Any = "cpu") -> dict[str, Any] | None:
    """The resume point at ``path``; None when there is none, or when it is unreadable: then the run says
    which file is corrupt, moves it aside (``<name>.corrupt``) and restarts cleanly from step 0."""
    import torch

    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("not a dfbench resume point")
        return state
    except Exception as err:  # truncated zip, bad pickle, a foreign object: the file is of no use
        aside = path.with_name(path.name + ".corrupt")
        with contextlib.suppress(FileNotFoundError):  # another rank moved it already
            os.replace(path, aside)
        print(f"dfbench train: warning: resume point {path} is corrupt ({type(err).__name__}: "
              f"{str(err).splitlines()[0] if str(err) else ''}); moved to {aside.name}, restarting from step 0",
              file=sys.stderr)
        return None


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


def write_splits(run_dir: Path, index_record: Mapping[str, Any], key: str) -> Path:
    """Store a run's in/out indices once per (dataset, trial seed, holdout) for all the runs beside it
    (``<parent>/.splits/<key>-<sha>.json``, content-addressed: 4.7 MB per DomainNet run otherwise); the
    run's ``splits.json`` keeps the domain names and sizes, the shared file's path and its sha256."""
    run_dir = Path(run_dir)
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


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # ValueError: not JSON, or not text at all
        return None


def iter_run_dirs(root: Path) -> Iterator[Path]:
    """Every directory below ``root`` that holds a results.jsonl."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):  # much faster than Path.rglob on 100k run dirs
        dirnames.sort()
        if RESULTS in filenames:
            found.append(Path(dirpath))
    yield from sorted(found)
