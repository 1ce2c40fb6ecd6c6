"""Reading run dirs: finding them, parsing their results.jsonl (in worker processes for big sweeps),
and warning once about what was skipped."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import pandas as pd

from domainfusion_bench import runfiles
from domainfusion_bench.collect.domains import DOMAINBED_ENVIRONMENTS, _splits_domains
from domainfusion_bench.collect.stale import configuration, stale_reason
from domainfusion_bench.frames.build import _frame, _FrameBuilder, infer_n_envs
from domainfusion_bench.frames.values import OVERRIDES
from domainfusion_bench.errors import DfbenchError

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
    stale_runs: dict[str, str] = field(default_factory=dict)  # left out: run -> what its fingerprint says differs
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
        if self.stale_runs:
            parts.append(f"stale runs (left out): {len(self.stale_runs)}")
        return parts[0] + " (" + "; ".join(parts[1:]) + ")"


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
    stale: str | None = None  # made under another configuration: left out, this says why


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
            fingerprint, stale = _fingerprint(run_dir, records)
            if stale is not None:
                out.append(_RunRead(name, done, stale=stale))
                continue
            first = len(builder.blocks)
            bad, blocks = builder.add(records, name)
            if fingerprint is not None and blocks:  # rows pool runs of one configuration only
                key = configuration(fingerprint, records[0].get("args"))
                for block in blocks:
                    block[1] = {**block[1], OVERRIDES: key}
            del records
            domains = _splits_domains(run_dir, splits_seen) if blocks else None
            out.append(_RunRead(name, done, None, skipped + bad, first, len(blocks), domains))
        builder.finish()
    return out, builder


def _fingerprint(run_dir: str, records: list) -> tuple[dict | None, str | None]:
    """(the run's fingerprint.json, why the run is stale); (None, None) for a run dir without one
    (DomainBed's): nothing to check it against."""
    path = os.path.join(run_dir, runfiles.FINGERPRINT)
    if not os.path.exists(path):
        return None, None
    fingerprint = runfiles.read_json(Path(path))
    if not isinstance(fingerprint, dict):
        return None, f"{runfiles.FINGERPRINT} is unreadable, so its configuration is unknown"
    checked: list = []
    for record in records:  # every distinct args of the run (one, unless the file was edited)
        args = record.get("args")
        if any(args == seen for seen in checked):
            continue
        checked.append(args)
        reason = stale_reason(fingerprint, args, record.get("hparams"))
        if reason is not None:
            return fingerprint, reason
    return fingerprint, None


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
        if read.stale is not None:
            coll.stale_runs[name] = read.stale
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
    if coll.stale_runs:
        where = "; ".join(f"{run}: {why}" for run, why in sorted(coll.stale_runs.items())[:5])
        more = f"; and {len(coll.stale_runs) - 5} more" if len(coll.stale_runs) > 5 else ""
        warnings.warn(f"left out {len(coll.stale_runs)} stale run(s), done under another configuration than "
                      f"their arguments resolve to now (rerun them with `dfbench sweep launch`, or delete them): "
                      f"{where}{more}", CollectWarning, stacklevel=3)
    if coll.duplicate_runs:
        warnings.warn(f"{coll.duplicate_runs} run dir(s) repeat the dataset/algorithm/test_envs/hparams_seed/"
                      "trial_seed of another run dir; their records are pooled (as DomainBed does)",
                      CollectWarning, stacklevel=3)
