"""Records -> one pandas frame: the frame builder (per block of records that share their ``args``), the
hyperparameter-variant rows, and the env count per dataset."""

from __future__ import annotations

import json
from itertools import chain
from operator import itemgetter
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from domainfusion_bench.frames.values import (
    ACC_KEY, KEY_COLUMNS, OVERRIDES, RENAMED, _args_row, _as_int, _is_number, _keep, _numbers,
)


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
                        key = RENAMED.get(key, key)
                        if key not in cols:
                            cols[key] = np.full(self.n, np.nan)
                        cols[key][rows] = matrix[:, j]
        if self.diverged:
            cols["diverged"] = np.full(self.n, np.nan)
            cols["diverged"][self.diverged] = 1.0
        return _frame(cols)


_NO_ARGS = object()


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
