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

import json
import re
import warnings
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

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


def _kept(keys: tuple[str, ...]) -> tuple[str, ...]:
    kept = []
    for key in keys:
        keep = _KEEP.get(key)
        if keep is None:
            keep = _KEEP[key] = type(key) is str and (bool(ACC_KEY.match(key)) or key in COST_KEY_SET
                                                      or key.startswith(COST_PREFIX) or key.startswith(METRIC_PREFIX))
        if keep:
            kept.append(key)
    return tuple(kept)


class _Flattener:
    """Records -> frame rows. The records of one run share their ``args`` and their key set: both are
    worked out once per distinct value, not once per record (1.8M records of a DomainBed-size sweep)."""

    def __init__(self) -> None:
        self._args: Any = None
        self._args_row: dict[str, Any] | None = None
        self._keys: dict[tuple, tuple[str, ...]] = {}
        self.base: dict[str, Any] | None = None  # the args part of the last row made

    def __call__(self, record: Any) -> dict[str, Any] | None:
        if not isinstance(record, Mapping):
            return None
        args = record.get("args")
        if args is not self._args and args != self._args:
            self._args, self._args_row = args, _args_row(args)
        base = self._args_row
        if base is None:
            return None
        self.base = base
        step = record.get("step")
        if type(step) is not int:
            step = _as_int(step)
            if step is None:
                return None
        row = base.copy()
        row["step"] = step
        keys = tuple(record)
        kept = self._keys.get(keys)
        if kept is None:
            kept = self._keys[keys] = _kept(keys)
        for key in kept:
            value = record[key]
            kind = type(value)
            if kind is float or kind is int:
                row[key] = float(value)
            else:
                number = _as_float(value)
                if number is not None:
                    row[key] = number
        if record.get("diverged_at") is not None:
            row["diverged"] = 1.0
        return row


def _flatten(record: Any) -> dict[str, Any] | None:
    """The frame row of one record, or None when it is not a usable record."""
    return _Flattener()(record)


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


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame.from_records(rows) if rows else pd.DataFrame(columns=KEY_COLUMNS)
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
    rows, bad = [], 0
    flatten = _Flattener()
    for record, run_name in zip(records, runs):
        row = flatten(record)
        if row is None:
            bad += 1
            continue
        row["run"] = run_name
        rows.append(row)
    return _frame(rows), bad


def _splits_domains(run_dir: Path) -> list[str] | None:
    data = runfiles.read_json(run_dir / runfiles.SPLITS)
    if not isinstance(data, dict):
        return None
    names = {}
    for key, value in data.items():
        m = re.fullmatch(r"env(\d+)", key)
        if m and isinstance(value, dict) and isinstance(value.get("domain"), str):
            names[int(m.group(1))] = value["domain"]
    if not names or sorted(names) != list(range(len(names))):
        return None
    return [names[i] for i in range(len(names))]


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
    return pd.Series(hi + 1, index=records["dataset"].to_numpy()).groupby(level=0).max().astype(int).to_dict()


def load_records(root: str | Path, include_incomplete: bool = False, warn: bool = True) -> Collection:
    """Every record of every run dir below ``root`` (a sweep dir, a folder of sweeps, or one run dir)."""
    root = Path(root)
    if not root.exists():
        raise DfbenchError(f"{root} does not exist: give the output dir of a sweep or of a run")
    if not root.is_dir():
        raise DfbenchError(f"{root} is not a directory: give the output dir of a sweep or of a run")
    coll = Collection(root=str(root), records=_frame([]))
    rows: list[dict[str, Any]] = []
    domains_from_runs: dict[str, list[str]] = {}
    keys_seen: dict[tuple, str] = {}
    flatten = _Flattener()
    for run_dir in runfiles.iter_run_dirs(root):
        name = str(run_dir.relative_to(root)) if run_dir != root else "."
        done = (run_dir / runfiles.DONE).exists()
        if not done and not include_incomplete:
            coll.incomplete_runs.append(name)
            continue
        try:
            records, skipped = runfiles.read_records(run_dir / runfiles.RESULTS)
        except (OSError, UnicodeDecodeError) as err:
            coll.skipped_by_file[name] = coll.skipped_by_file.get(name, 0) + 1
            coll.skipped_lines += 1
            if warn:
                warnings.warn(f"could not read {run_dir / runfiles.RESULTS}: {err}", CollectWarning, stacklevel=2)
            continue
        run_rows, run_keys, base = [], set(), None
        for record in records:
            row = flatten(record)
            if row is None:
                skipped += 1
            else:
                row["run"] = name
                run_rows.append(row)
                if flatten.base is not base:  # the run key changes only with args
                    base = flatten.base
                    run_keys.add(tuple(row[k] for k in RUN_KEY) + (row.get(OVERRIDES),))
        if skipped:
            coll.skipped_by_file[name] = skipped
            coll.skipped_lines += skipped
        if not run_rows:
            continue
        if not done:
            coll.included_incomplete.append(name)
        dataset, names = run_rows[0]["dataset"], _splits_domains(run_dir)
        if names and domains_from_runs.setdefault(dataset, names) != names:  # another version of the dataset
            dataset = f"{dataset} ({', '.join(names)})"
            domains_from_runs.setdefault(dataset, names)
            for row in run_rows:
                row["dataset"] = dataset
        coll.runs += 1
        for key in run_keys:
            if key in keys_seen and keys_seen[key] != name:
                coll.duplicate_runs += 1
            keys_seen.setdefault(key, name)
        rows.extend(run_rows)
    coll.records = _frame(rows)

    for dataset, n in sorted(infer_n_envs(coll.records).items()):
        names = domains_from_runs.get(dataset)
        if not names or len(names) != n:
            names = DOMAINBED_ENVIRONMENTS.get(dataset)
        if not names or len(names) != n:  # unknown dataset, or records that disagree with the list
            names = [f"env{i}" for i in range(n)]
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
