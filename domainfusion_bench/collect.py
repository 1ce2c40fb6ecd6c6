"""Load the records of run directories into one pandas frame (DESIGN.md section 2: collector).

Reads dfbench run dirs and DomainBed run dirs unchanged: both hold a ``results.jsonl`` (one JSON object
per checkpoint, with ``args`` naming dataset / algorithm / test_envs / hparams_seed / trial_seed, a
``step`` and ``env{i}_in_acc`` / ``env{i}_out_acc`` keys) and a ``done`` file once finished.

Never crashes on a damaged file: a truncated or non-JSON line, or a JSON line that is not a usable
record, is skipped and counted; the loader warns once with the counts. Runs without a ``done`` file are
ignored (a crashed or still-running run is not a result) unless ``include_incomplete``.

The frame has one row per record and these columns:

- ``run``: the run dir, relative to the collected root;
- ``dataset``, ``algorithm`` (str), ``trial_seed``, ``hparams_seed``, ``step`` (int);
- ``test_env`` (the first test env), ``test_env2`` (the second, -1 for a single-test-env run) and
  ``n_test_envs``;
- ``env{i}_in_acc`` / ``env{i}_out_acc`` for every key any record has (NaN where a record lacks it);
- cost columns where present: ``wall_time``, ``images_per_s``, ``mem_gb``, ``step_time`` and every
  ``cost_*`` key.
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import re
import warnings
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd

from domainfusion_bench import runfiles
from domainfusion_bench.costs import COST_PREFIX
from domainfusion_bench.errors import DfbenchError

ACC_KEY = re.compile(r"^env(\d+)_(in|out)_acc$")
COST_KEYS = ("wall_time", "images_per_s", "mem_gb", "step_time")
METRIC_PREFIX = "metric_"  # a method's own numbers (training.MetricMeter)
OVERRIDES = "_overrides"  # the run's hyperparameter overrides (JSON), while the frame is built
KEY_COLUMNS = ["run", "dataset", "algorithm", "trial_seed", "hparams_seed", "test_env", "test_env2",
               "n_test_envs", "step"]
RUN_KEY = ["dataset", "algorithm", "test_env", "test_env2", "n_test_envs", "hparams_seed", "trial_seed"]


class CollectWarning(UserWarning):
    """Something in the results was skipped or looks doubtful; the message says what and how much."""


@dataclass
class Collection:
    """What ``load_records`` found under a root."""

    root: str
    records: pd.DataFrame
    runs: int = 0  # runs whose records are in ``records``
    skipped_lines: int = 0  # truncated / non-JSON lines and JSON lines that are not usable records
    skipped_by_file: dict[str, int] = field(default_factory=dict)
    incomplete_runs: list[str] = field(default_factory=list)  # not done and ignored
    included_incomplete: list[str] = field(default_factory=list)  # not done but included
    duplicate_runs: int = 0  # run dirs whose run key another run dir already has
    domains: dict[str, list[str]] = field(default_factory=dict)  # dataset -> domain names by env index

    @property
    def n_envs(self) -> dict[str, int]:
        return {name: len(doms) for name, doms in self.domains.items()}

    def summary(self) -> str:
        parts = [f"Total records: {len(self.records)}", f"runs: {self.runs}"]
        if self.skipped_lines:
            parts.append(f"skipped lines: {self.skipped_lines}")
        if self.incomplete_runs:
            parts.append(f"runs not done (ignored): {len(self.incomplete_runs)}")
        if self.included_incomplete:
            parts.append(f"runs not done (included): {len(self.included_incomplete)}")
        return parts[0] + " (" + "; ".join(parts[1:]) + ")"


def _as_int(value: Any) -> int | None:
    kind = type(value)
    if kind is int:  # what json gives; checked first because this runs for every record
        return value
    if kind is bool:
        return None
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real) and float(value).is_integer():
        return int(value)
    if kind is str:
        try:
            return int(value)
        except ValueError:  # "--1", "²", "3.5": not a seed
            return None
    return None


def _as_float(value: Any) -> float | None:
    kind = type(value)
    if kind is float or kind is int:
        return float(value)
    if kind is bool or not isinstance(value, Real):
        return None
    return float(value)


COST_KEY_SET = frozenset(COST_KEYS)
_KEEP: dict[str, bool] = {}  # record key -> whether the frame keeps it (few distinct keys, many records)


def _args_row(args: Any) -> dict[str, Any] | None:
    """The part of a frame row that comes from a record's ``args`` (None: not usable)."""
    if not isinstance(args, Mapping):
        return None
    dataset, algorithm = args.get("dataset"), args.get("algorithm")
    test_envs = args.get("test_envs")
    if type(dataset) is not str or type(algorithm) is not str or not isinstance(test_envs, (list, tuple)):
        return None
    envs = [_as_int(t) for t in test_envs]
    trial_seed, hparams_seed = _as_int(args.get("trial_seed")), _as_int(args.get("hparams_seed"))
    if not envs or any(t is None or t < 0 for t in envs) or None in (trial_seed, hparams_seed):
        return None
    track = args.get("track")
    if type(track) is str and track and track != "DG":  # an oracle or few-shot-target row: never read as DG
        algorithm = f"{algorithm} [{track}]"
    row: dict[str, Any] = {
        "dataset": dataset,
        "algorithm": algorithm,
        "trial_seed": trial_seed,
        "hparams_seed": hparams_seed,
        "test_env": envs[0],
        "test_env2": envs[1] if len(envs) > 1 else -1,
        "n_test_envs": len(envs),
    }
    overrides = args.get("hparams")
    if overrides:  # a sweep's grid point (or fixed overrides): runs that differ here are not pooled
        row[OVERRIDES] = overrides if isinstance(overrides, str) else json.dumps(overrides, sort_keys=True)
    return row


def _keep(key: Any) -> bool:
    keep = _KEEP.get(key)
    if keep is None:
        keep = _KEEP[key] = type(key) is str and (bool(ACC_KEY.match(key)) or key in COST_KEY_SET
                                                  or key.startswith(COST_PREFIX) or key.startswith(METRIC_PREFIX))
    return keep


_NUMBER_OR_NONE = frozenset({float, int, type(None)})


def _numbers(values: list[Any], width: int) -> np.ndarray:
    """Raw record values, ``width`` per record, as a float64 matrix (records x width); NaN where a value is
    missing (None) or not a number (bools and strings are not numbers)."""
    if _NUMBER_OR_NONE.issuperset(map(type, values)):  # JSON numbers and nulls: numpy converts them itself
        try:
            return np.array(values, dtype=np.float64).reshape(-1, width)
        except OverflowError:  # an int beyond float range: the slow path says which
            pass
    out = []
    for value in values:
        try:
            number = _as_float(value)
        except OverflowError:
            number = None
        out.append(np.nan if number is None else number)
    return np.array(out, dtype=np.float64).reshape(-1, width)


class _Pending:
    """Raw values of one key set (``kept``) waiting to become a matrix: converted a million at a time, not
    per run, so that the cost per run stays a few list operations."""

    LIMIT = 1 << 20

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.rows: list[tuple[int, int]] = []  # (first row, rows) of each block


class _FrameBuilder:
    """Records -> frame columns, built per block of records that share their ``args`` (the records of
    one run), never one dict per record: a DomainBed-size sweep has 1.8M records. Every record is still
    checked on its own: a usable ``args`` and an integer ``step``; kept keys whose value is not a number
    are NaN, as if absent."""

    def __init__(self) -> None:
        self.n = 0  # rows so far
        self.blocks: list[list[Any]] = []  # [run name, base row (the args part), first row, rows]
        self.steps: list[int] = []
        self.numbers: dict[tuple[str, ...], list[tuple[np.ndarray, np.ndarray]]] = {}  # kept -> (rows, matrix)
        self.pending: dict[tuple[str, ...], _Pending] = {}
        self.usable: set[str] = set()  # number columns with at least one usable value
        self.diverged: list[int] = []  # rows of diverged records
        self._kept: dict[frozenset, tuple[str, ...]] = {}
        self._args: Any = _NO_ARGS
        self._base: dict[str, Any] | None = None

    def add(self, records: Iterable[Any], run: str) -> tuple[int, list[list[Any]]]:
        """Add one run's records; returns (records that are not usable, the blocks added)."""
        bad, added, block = 0, [], []
        if type(records) is list and records and set(map(type, records)) == {dict}:
            args = records[0].get("args")
            if [r.get("args") for r in records].count(args) == len(records):  # the usual run: one args
                if args is not self._args and args != self._args:
                    self._args, self._base = args, _args_row(args)
                if self._base is None:
                    return len(records), added
                return self._close(records, run, added), added
        for record in records:
            if type(record) is not dict and not isinstance(record, Mapping):
                bad += 1
                continue
            args = record.get("args")
            if args is not self._args and args != self._args:
                if block:
                    bad += self._close(block, run, added)
                    block = []
                self._args, self._base = args, _args_row(args)
            if self._base is None:
                bad += 1
                continue
            block.append(record)
        if block:
            bad += self._close(block, run, added)
        return bad, added

    def _close(self, block: list[Mapping], run: str, added: list[list[Any]]) -> int:
        steps = [r.get("step") for r in block]
        bad = 0
        if set(map(type, steps)) != {int}:
            steps = [s if type(s) is int else _as_int(s) for s in steps]
            keep = [s is not None for s in steps]
            bad = keep.count(False)
            block = [r for r, k in zip(block, keep) if k]
            steps = [s for s in steps if s is not None]
            if not block:
                return bad
        keys = frozenset().union(*block)
        kept = self._kept.get(keys)
        if kept is None:
            kept = self._kept[keys] = tuple(sorted(k for k in keys if _keep(k)))
        first, n = self.n, len(block)
        if kept:
            pending = self.pending.get(kept)
            if pending is None:
                pending = self.pending[kept] = _Pending()
            try:  # the usual block: every record has every key
                rows = list(map(itemgetter(*kept), block))
                if len(kept) == 1:
                    pending.values += rows
                else:
                    pending.values += chain.from_iterable(rows)
            except KeyError:
                pending.values += [r.get(k) for r in block for k in kept]
            pending.rows.append((first, n))
            if len(pending.values) >= _Pending.LIMIT:
                self._convert(kept)
        if "diverged_at" in keys:
            self.diverged += [first + i for i, r in enumerate(block) if r.get("diverged_at") is not None]
        self.steps += steps
        entry = [run, self._base, first, n]
        self.blocks.append(entry)
        added.append(entry)
        self.n += n
        return bad

    def _convert(self, kept: tuple[str, ...]) -> None:
        pending = self.pending.pop(kept)
        matrix = _numbers(pending.values, len(kept))
        rows = np.concatenate([np.arange(first, first + n) for first, n in pending.rows])
        self.numbers.setdefault(kept, []).append((rows, matrix))
        if not self.usable.issuperset(kept):
            for j, key in enumerate(kept):
                if key not in self.usable and (not np.isnan(matrix[:, j]).all()
                                               or any(_is_number(v) for v in pending.values[j::len(kept)])):
                    self.usable.add(key)

    def finish(self) -> None:
        """Convert what is pending (before ``frame``, or before sending the builder to another process)."""
        for kept in list(self.pending):
            self._convert(kept)
        self._args, self._base, self._kept = _NO_ARGS, None, {}

    def extend(self, other: "_FrameBuilder") -> None:
        """Append another (finished) builder's rows after these."""
        other.finish()
        offset = self.n
        self.blocks += [[run, base, first + offset, n] for run, base, first, n in other.blocks]
        self.steps += other.steps
        for kept, parts in other.numbers.items():
            self.numbers.setdefault(kept, []).extend((rows + offset, matrix) for rows, matrix in parts)
        self.usable |= other.usable
        self.diverged += [offset + i for i in other.diverged]
        self.n += other.n

    def frame(self) -> pd.DataFrame:
        self.finish()
        if not self.n:
            return _frame({})
        lengths = np.array([b[3] for b in self.blocks], dtype=np.int64)
        bases = [b[1] for b in self.blocks]
        cols: dict[str, Any] = {"run": np.repeat(np.array([b[0] for b in self.blocks], dtype=object), lengths)}
        for key in ("dataset", "algorithm"):
            cols[key] = np.repeat(np.array([b[key] for b in bases], dtype=object), lengths)
        for key in ("trial_seed", "hparams_seed", "test_env", "test_env2", "n_test_envs"):
            cols[key] = np.repeat(np.array([b[key] for b in bases], dtype=np.int64), lengths)
        cols["step"] = np.array(self.steps, dtype=np.int64)
        if any(OVERRIDES in b for b in bases):
            cols[OVERRIDES] = np.repeat(np.array([b.get(OVERRIDES) for b in bases], dtype=object), lengths)
        for kept, parts in self.numbers.items():
            for rows, matrix in parts:
                for j, key in enumerate(kept):
                    if key in self.usable:
                        if key not in cols:
                            cols[key] = np.full(self.n, np.nan)
                        cols[key][rows] = matrix[:, j]
        if self.diverged:
            cols["diverged"] = np.full(self.n, np.nan)
            cols["diverged"][self.diverged] = 1.0
        return _frame(cols)


_NO_ARGS = object()


def _is_number(value: Any) -> bool:
    try:
        return _as_float(value) is not None
    except OverflowError:
        return False


def _acc_sort_key(name: str) -> tuple[int, int]:
    m = ACC_KEY.match(name)
    return (int(m.group(1)), 0 if m.group(2) == "in" else 1) if m else (10**9, 0)


def _split_variants(df: pd.DataFrame) -> pd.DataFrame:
    """Runs of one algorithm with different hyperparameter overrides (a sweep's ``grid`` points) become
    rows of their own, ``ERM [lr=0.001]``, under every selection method: pooling them would let selection
    pick an arbitrary grid point. Only the overrides that differ between those runs name the row."""
    if OVERRIDES not in df:
        return df
    overrides = df.pop(OVERRIDES).fillna("")
    for (dataset, algorithm), sub in overrides.groupby([df["dataset"], df["algorithm"]]):
        variants = sorted(sub.unique())
        if len(variants) < 2:
            continue
        parsed = {}
        for v in variants:
            try:
                parsed[v] = json.loads(v) if v else {}
            except ValueError:
                parsed[v] = {"hparams": v}
            if not isinstance(parsed[v], dict):
                parsed[v] = {"hparams": v}
        names = sorted({k for p in parsed.values() for k in p})
        differ = [k for k in names if len({json.dumps(p.get(k), sort_keys=True) for p in parsed.values()}) > 1]
        labels = {v: f"{algorithm} [{', '.join(f'{k}={parsed[v].get(k)}' for k in differ)}]" for v in variants}
        df.loc[sub.index, "algorithm"] = sub.map(labels)
    return df


def _frame(columns: Mapping[str, Any]) -> pd.DataFrame:
    df = pd.DataFrame(dict(columns)) if columns else pd.DataFrame(columns=KEY_COLUMNS)
    df = _split_variants(df)
    for col in KEY_COLUMNS:
        if col not in df:
            df[col] = pd.Series(dtype=object if col in ("run", "dataset", "algorithm") else "int64")
    for col in ("trial_seed", "hparams_seed", "test_env", "test_env2", "n_test_envs", "step"):
        df[col] = df[col].astype("int64")
    accs = sorted((c for c in df.columns if ACC_KEY.match(c)), key=_acc_sort_key)
    rest = sorted(c for c in df.columns if c not in KEY_COLUMNS and c not in accs)
    for col in accs + rest:
        df[col] = df[col].astype("float64")
    return df[KEY_COLUMNS + accs + rest].reset_index(drop=True)


def records_to_frame(records: Iterable[Any], run: str | Sequence[str] = "run") -> tuple[pd.DataFrame, int]:
    """Records (dicts as in results.jsonl) -> (frame, number of records that were not usable).

    ``run`` names the run dir of every record (one name for all, or one per record).
    """
    records = list(records)
    runs = [run] * len(records) if isinstance(run, str) else list(run)
    if len(runs) != len(records):
        raise ValueError("one run name per record, or one for all")
    builder, bad, i = _FrameBuilder(), 0, 0
    while i < len(records):  # consecutive records of one run go in together
        j = i + 1
        while j < len(records) and runs[j] == runs[i]:
            j += 1
        bad += builder.add(records[i:j], runs[i])[0]
        i = j
    return builder.frame(), bad


def _splits_domains(run_dir: str, seen: dict[bytes, tuple[str, ...] | None]) -> list[str] | None:
    """Domain names from a run's splits.json; ``seen`` remembers small files by their text (the runs of a
    sweep share one text per trial)."""
    try:
        with open(os.path.join(run_dir, runfiles.SPLITS), "rb", buffering=0) as f:
            text = f.readall()
    except OSError:  # missing (DomainBed's run dirs) or unreadable
        return None
    if text in seen:
        names = seen[text]
    else:
        names = _parse_splits_domains(text)
        if len(text) < 1 << 16:  # not an old run's splits.json with every index
            seen[text] = names
    return None if names is None else list(names)


def _parse_splits_domains(text: bytes) -> tuple[str, ...] | None:
    try:
        data = runfiles.loads(text)
    except ValueError:  # not JSON
        return None
    if not isinstance(data, dict):
        return None
    names = {}
    for key, value in data.items():
        m = re.fullmatch(r"env(\d+)", key)
        if m and isinstance(value, dict) and isinstance(value.get("domain"), str):
            names[int(m.group(1))] = value["domain"]
    if not names or sorted(names) != list(range(len(names))):
        return None
    return tuple(names[i] for i in range(len(names)))


# DomainBed's own environment labels (its datasets.py ENVIRONMENTS), for DomainBed run dirs: they have no
# splits.json, and their tables should read as DomainBed prints them. Kept here, not taken from the
# dataset registry, so collecting never imports torch.
DOMAINBED_ENVIRONMENTS = {
    "ColoredMNIST": ["+90%", "+80%", "-90%"],
    "RotatedMNIST": ["0", "15", "30", "45", "60", "75"],
    "VLCS": ["C", "L", "S", "V"],
    "PACS": ["A", "C", "P", "S"],
    "OfficeHome": ["A", "C", "P", "R"],
    "TerraIncognita": ["L100", "L38", "L43", "L46"],
    "DomainNet": ["clip", "info", "paint", "quick", "real", "sketch"],
}


def infer_n_envs(records: pd.DataFrame) -> dict[str, int]:
    """Number of domains per dataset: the highest env index any record names (in an acc key or test_envs) + 1."""
    if records.empty:
        return {}
    acc_cols = [c for c in records.columns if ACC_KEY.match(c)]
    hi = np.maximum(records["test_env"].to_numpy(), records["test_env2"].to_numpy())
    if acc_cols:
        idx = np.array([int(ACC_KEY.match(c).group(1)) for c in acc_cols])
        has = records[acc_cols].notna().to_numpy()
        hi = np.maximum(hi, np.where(has, idx[None, :], -1).max(axis=1))
    codes, names = pd.factorize(records["dataset"])
    most = np.full(len(names), -1, dtype=np.int64)
    np.maximum.at(most, codes, hi.astype(np.int64))
    return {name: int(n) + 1 for name, n in zip(names, most)}


def _run_dirs(root: Path) -> list[tuple[str, bool]]:
    """(path, has a ``done`` file) of every directory below ``root`` that holds a results.jsonl, in the
    order of ``runfiles.iter_run_dirs`` (path components compared in turn); one listing per directory,
    symlinked directories not followed (as ``os.walk``)."""
    found, todo = [], [str(root)]
    while todo:
        top = todo.pop()
        files, names = set(), set()
        try:
            with os.scandir(top) as entries:
                for entry in entries:
                    names.add(entry.name)
                    if entry.is_dir(follow_symlinks=False):
                        todo.append(entry.path)
                    else:
                        files.add(entry.name)
        except OSError:  # unreadable or vanished directory: os.walk skips it too
            continue
        if runfiles.RESULTS in files:
            found.append((top, runfiles.DONE in names))
    found.sort(key=lambda item: item[0].split(os.sep))
    return found


@contextmanager
def _no_gc() -> Iterator[None]:
    """Collect garbage after, not during, loading: the records of a big sweep are millions of young
    containers, and the cyclic collector would walk them again and again (about a third of the time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


PARALLEL_MIN_RUNS = 20000  # below this (360k records), forking and merging cost more than they save


class _RunRead(NamedTuple):
    """What reading one run dir gave (in a worker or not); its records are in the builder's blocks."""

    name: str
    done: bool
    error: str | None = None  # results.jsonl could not be read
    skipped: int = 0
    first_block: int = 0
    n_blocks: int = 0
    domains: tuple[str, ...] | None = None


def _read_runs(runs: Sequence[tuple[str, str, bool]], include_incomplete: bool) -> tuple[list[_RunRead], _FrameBuilder]:
    """Read run dirs ``(path, name, done)`` in order into one frame builder."""
    builder, splits_seen, out = _FrameBuilder(), {}, []
    with _no_gc():
        for run_dir, name, done in runs:
            if not done and not include_incomplete:
                out.append(_RunRead(name, done))
                continue
            results = os.path.join(run_dir, runfiles.RESULTS)
            try:
                records, skipped = runfiles.read_records(results)
            except (OSError, UnicodeDecodeError) as err:
                out.append(_RunRead(name, done, error=f"could not read {results}: {err}"))
                continue
            first = len(builder.blocks)
            bad, blocks = builder.add(records, name)
            del records
            domains = _splits_domains(run_dir, splits_seen) if blocks else None
            out.append(_RunRead(name, done, None, skipped + bad, first, len(blocks), domains))
        builder.finish()
    return out, builder


def _workers(n_runs: int, workers: int | None) -> int:
    if workers is None:
        if n_runs < PARALLEL_MIN_RUNS or "fork" not in mp.get_all_start_methods():
            return 1
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(int(workers), 8, n_runs))


def load_records(root: str | Path, include_incomplete: bool = False, warn: bool = True,
                 workers: int | None = None) -> Collection:
    """Every record of every run dir below ``root`` (a sweep dir, a folder of sweeps, or one run dir).

    ``workers``: processes that read run dirs (default: one per CPU core, at most 8, for sweeps of 20,000
    runs or more, where parsing is most of the time); the result does not depend on it.
    """
    root = Path(root)
    if not root.exists():
        raise DfbenchError(f"{root} does not exist: give the output dir of a sweep or of a run")
    if not root.is_dir():
        raise DfbenchError(f"{root} is not a directory: give the output dir of a sweep or of a run")
    coll = Collection(root=str(root), records=_frame({}))
    top = str(root)
    runs = [(d, d[len(top) + 1:] if d != top else ".", done) for d, done in _run_dirs(root)]
    n = _workers(len(runs), workers)
    if n == 1:
        parts = [_read_runs(runs, include_incomplete)]
    else:  # contiguous slices, merged in order: the frame is the one a single process builds
        bounds = np.linspace(0, len(runs), n + 1).astype(int)
        slices = [runs[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
        with ProcessPoolExecutor(n, mp_context=mp.get_context("fork")) as pool:
            parts = list(pool.map(_read_runs, slices, [include_incomplete] * n))
    builder, reads = parts[0][1], list(parts[0][0])
    for part_reads, part in parts[1:]:
        offset = len(builder.blocks)
        reads += [r._replace(first_block=r.first_block + offset) for r in part_reads]
        builder.extend(part)

    domains_from_runs: dict[str, tuple[str, ...]] = {}
    keys_seen: dict[tuple, str] = {}
    for read in reads:
        name = read.name
        if not read.done and not include_incomplete:
            coll.incomplete_runs.append(name)
            continue
        if read.error is not None:
            coll.skipped_by_file[name] = coll.skipped_by_file.get(name, 0) + 1
            coll.skipped_lines += 1
            if warn:
                warnings.warn(read.error, CollectWarning, stacklevel=2)
            continue
        if read.skipped:
            coll.skipped_by_file[name] = read.skipped
            coll.skipped_lines += read.skipped
        if not read.n_blocks:
            continue
        if not read.done:
            coll.included_incomplete.append(name)
        blocks = builder.blocks[read.first_block:read.first_block + read.n_blocks]
        dataset, names = blocks[0][1]["dataset"], read.domains
        if names and domains_from_runs.setdefault(dataset, names) != names:  # another version of the dataset
            dataset = f"{dataset} ({', '.join(names)})"
            domains_from_runs.setdefault(dataset, names)
            for block in blocks:
                block[1] = {**block[1], "dataset": dataset}
        coll.runs += 1
        # after the renaming: runs of two versions of a dataset are not repeats of each other
        for key in {tuple(block[1][k] for k in RUN_KEY) + (block[1].get(OVERRIDES),) for block in blocks}:
            if key in keys_seen and keys_seen[key] != name:
                coll.duplicate_runs += 1
            keys_seen.setdefault(key, name)
    coll.records = builder.frame()

    for dataset, n_envs in sorted(infer_n_envs(coll.records).items()):
        names = domains_from_runs.get(dataset)
        if not names or len(names) != n_envs:
            names = DOMAINBED_ENVIRONMENTS.get(dataset)
        if not names or len(names) != n_envs:  # unknown dataset, or records that disagree with the list
            names = [f"env{i}" for i in range(n_envs)]
        coll.domains[dataset] = list(names)

    if warn:
        _warn(coll)
    return coll


def _warn(coll: Collection) -> None:
    if coll.skipped_lines:
        where = ", ".join(f"{run} ({n})" for run, n in sorted(coll.skipped_by_file.items())[:5])
        more = f" and {len(coll.skipped_by_file) - 5} more files" if len(coll.skipped_by_file) > 5 else ""
        warnings.warn(f"skipped {coll.skipped_lines} unreadable line(s) (truncated, not JSON, or not a record) "
                      f"in {len(coll.skipped_by_file)} results.jsonl file(s): {where}{more}", CollectWarning, stacklevel=3)
    if coll.incomplete_runs and not coll.runs:
        warnings.warn(f"{len(coll.incomplete_runs)} run(s) found under {coll.root}, none done: "
                      "use --include-incomplete to collect them anyway", CollectWarning, stacklevel=3)
    if coll.duplicate_runs:
        warnings.warn(f"{coll.duplicate_runs} run dir(s) repeat the dataset/algorithm/test_envs/hparams_seed/"
                      "trial_seed of another run dir; their records are pooled (as DomainBed does)",
                      CollectWarning, stacklevel=3)
