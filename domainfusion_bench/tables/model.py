"""The table model: cells (mean +- error over trials, count, reason when short), tables, leaderboards, and
the numbers and notes every table shares."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from domainfusion_bench.selection import ranges

ERRORS = {
    "domainbed": "std (ddof 0) / sqrt(n) over trials, as DomainBed",
    "sem": "standard error of the mean (std ddof 1 / sqrt(n)) over trials",
    "ci95": "half-width of the t-based 95% confidence interval over trials",
}


@dataclass
class Cell:
    mean: float | None  # accuracy cells: percent
    error: float | None = None
    n: int = 0
    expected: int = 0
    reason: str | None = None


@dataclass
class Table:
    kind: str  # "dataset" | "averages" | "costs"
    title: str
    columns: list[str]
    rows: list[str]
    cells: dict[tuple[str, str], Cell]
    selection: str | None = None
    dataset: str | None = None
    notes: list[str] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)  # per-column number format (cost tables)
    column_datasets: dict[str, str] = field(default_factory=dict)  # averages: column label -> dataset


@dataclass
class Leaderboard:
    tables: list[Table]
    error: str = "domainbed"
    selections: list[str] = field(default_factory=list)
    summary: str = ""
    domains: dict[str, list[str]] = field(default_factory=dict)
    selected: pd.DataFrame | None = None  # the selection output the accuracy tables were built from
    costs: pd.DataFrame | None = None  # per dataset x algorithm, the cost table values


def error_bar(values: Sequence[float], kind: str = "domainbed") -> float:
    """The error bar of ``values`` (same units as the values); NaN when it is not defined."""
    if kind not in ERRORS:
        raise ValueError(f"unknown error bar {kind!r}; choices: {', '.join(ERRORS)}")
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return float("nan")
    if kind == "domainbed":
        return float(np.std(x, ddof=0) / math.sqrt(n))
    if n < 2:
        return float("nan")
    sem = float(np.std(x, ddof=1) / math.sqrt(n))
    if kind == "sem":
        return sem
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1) * sem)


def _summarise(df: pd.DataFrame, keys: list[str], value: str, kind: str) -> pd.DataFrame:
    """Mean, error bar and count of ``value`` per ``keys`` (NaN values dropped), vectorised."""
    df = df[df[value].notna()]
    g = df.groupby(keys, sort=False)[value]
    out = pd.DataFrame({"mean": g.mean(), "n": g.size(), "sd0": g.std(ddof=0), "sd1": g.std(ddof=1)}).reset_index()
    n = out["n"].to_numpy(dtype=float)
    if kind == "domainbed":
        err = out["sd0"].to_numpy() / np.sqrt(n)
    else:
        err = np.where(n >= 2, out["sd1"].to_numpy() / np.sqrt(n), np.nan)
        if kind == "ci95":
            from scipy import stats

            err = err * stats.t.ppf(0.975, np.maximum(n - 1, 1))
    out["error"] = err
    return out.drop(columns=["sd0", "sd1"])


def algorithm_order(names) -> list[str]:
    """ERM first (the baseline, as in DomainBed's tables), then alphabetical; rows that are not DG results
    ("CDGA* [oracle]", "TGDP-FS [few-shot target]": collect labels them from the runs' args) last."""
    names = sorted(set(names), key=lambda s: (s != "ERM", s.endswith("]"), s.lower(), s))
    return names


def _trials_text(trials: Sequence[int]) -> str:
    return ("trial " if len(trials) == 1 else "trials ") + ranges(trials)


def _cell_reason(failed: pd.DataFrame) -> str | None:
    """'trials 0-2: reason; trial 3: other reason' for the failed groups of one cell."""
    if failed.empty:
        return None
    parts = []
    for reason, sub in failed.groupby("reason", sort=True):
        parts.append(f"{_trials_text(sub['trial_seed'].tolist())}: {reason}")
    return "; ".join(parts)


def _notes(table: Table) -> list[str]:
    issues = [(r, c, cell) for (r, c), cell in table.cells.items()
              if c != "Avg" and cell.reason and cell.n < cell.expected]
    if not issues:
        return []
    order = {(r, c): i for i, (r, c) in enumerate((r, c) for r in table.rows for c in table.columns)}
    issues.sort(key=lambda x: order.get((x[0], x[1]), 0))
    n_value_cells = sum(1 for (r, c) in table.cells if c != "Avg")
    texts = {cell.reason for _, _, cell in issues}
    if len(issues) == n_value_cells and len(texts) == 1 and all(cell.n == 0 for _, _, cell in issues):
        return [f"every cell: {texts.pop()}"]
    return [f"{r} / {c}: {cell.reason}" for r, c, cell in issues]
