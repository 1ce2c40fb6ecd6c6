"""Leaderboard tables from selected results (DESIGN.md section 3, "Tables"; section 5, costs).

For each selection method: one table per dataset (rows: algorithms; columns: its domains, then Avg) and
an averages table (columns: datasets, then Avg).

- A cell is the mean over trials of the selected test accuracy, x100, and an error bar:
  ``domainbed`` = population std (ddof 0) / sqrt(n) (DomainBed's), ``sem`` = sample std (ddof 1) /
  sqrt(n), ``ci95`` = half-width of the t-based 95% interval (t_{0.975, n-1} * sem). With one trial,
  ``sem`` and ``ci95`` have no bar.
- "Avg" is the unweighted mean of the row's column means (X when a column has no value).
- Columns are the domains some single-test-env run holds out (all of them in a full sweep); a partial
  sweep's tables say which domains are left out and that Avg covers only the rest.
- The averages table first averages each trial over the dataset's domains (a trial counts only when it
  has a value for every domain), then takes mean +- error over those trials.
- ``(n=k)`` follows a cell with fewer trials than the dataset has; ``X`` marks a cell without any, and
  a note under the table says which runs are missing.
- Cost tables (optional): per dataset and algorithm, the mean over runs of the run's wall time (its
  last record's ``wall_time``), images/s (mean over its records), peak memory (max ``mem_gb``) and every
  ``cost_*`` key (last record: they are running totals).

Formats: ``text`` (close to DomainBed's collect_results), ``markdown``, ``latex`` (booktabs, whole
cells), ``csv`` / ``json`` (long form: one row per cell).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from domainfusion_bench.selection import METHODS, select_all

ERRORS = {
    "domainbed": "std (ddof 0) / sqrt(n) over trials, as DomainBed",
    "sem": "standard error of the mean (std ddof 1 / sqrt(n)) over trials",
    "ci95": "half-width of the t-based 95% confidence interval over trials",
}
FORMATS = ("text", "markdown", "latex", "csv", "json", "html")
LONG_COLUMNS = ["table", "selection", "dataset", "algorithm", "column", "mean", "error", "n", "expected_n", "reason"]

# cost columns: record key -> (label, how one run is summarised, number format)
COST_COLUMNS = {
    "wall_time": ("wall time (s)", "last", "{:.1f}"),
    "images_per_s": ("images/s", "mean", "{:.0f}"),
    "mem_gb": ("peak mem (GB)", "max", "{:.2f}"),
}
COST_LABELS = {
    "cost_generated_images": ("generated images", "{:.0f}"),
    "cost_nfes": ("NFEs", "{:.0f}"),
    "cost_nfe": ("NFEs", "{:.0f}"),
    "cost_generation_seconds": ("generation (s)", "{:.1f}"),
    "cost_diffusion_train_seconds": ("diffusion train (s)", "{:.1f}"),
}
REUSED = "cost_reused_"  # work done once (by another run or an earlier attempt) and reused by this run


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


# ---------------------------------------------------------------------------------------------------
# numbers


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
    from domainfusion_bench.selection import _ranges

    return ("trial " if len(trials) == 1 else "trials ") + _ranges(trials)


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


# ---------------------------------------------------------------------------------------------------
# building


def build_leaderboard(records: pd.DataFrame, domains: Mapping[str, Sequence[str]] | None = None,
                      selections: Sequence[str] = tuple(METHODS), error: str = "domainbed",
                      costs: bool = False, summary: str = "", metrics: bool = False) -> Leaderboard:
    """All tables for ``records`` (a collect frame). ``domains``: dataset -> domain names by env index."""
    if error not in ERRORS:
        raise ValueError(f"unknown error bar {error!r}; choices: {', '.join(ERRORS)}")
    for m in selections:
        if m not in METHODS:
            raise ValueError(f"unknown selection method {m!r}; choices: {', '.join(METHODS)}")
    from domainfusion_bench.collect import infer_n_envs

    n_envs = dict(infer_n_envs(records))
    names = {}
    for dataset, n in n_envs.items():
        given = list((domains or {}).get(dataset) or [])
        n = max(n, len(given))
        n_envs[dataset] = n
        names[dataset] = given if len(given) == n else [f"env{i}" for i in range(n)]
    selected = select_all(records, list(selections), n_envs)
    shown = held_out_envs(records, n_envs)
    selected = selected[[env in shown[d] for d, env in zip(selected["dataset"], selected["test_env"])]]
    board = Leaderboard(tables=[], error=error, selections=list(selections), summary=summary, domains=names,
                        selected=selected)
    diverged = diverged_notes(records)
    for method in selections:
        sel = selected[selected["selection"] == method]
        for dataset in sorted(names):
            table = _dataset_table(sel[sel["dataset"] == dataset], method, dataset, names[dataset], shown[dataset],
                                   error)
            table.notes += diverged.get(dataset, [])
            board.tables.append(table)
        averages = _averages_table(sel, method, names, error)
        averages.notes += [f"{d}: averaged over the {len(shown[d])} of {len(names[d])} domains some run holds out"
                           for d in sorted(names) if len(shown[d]) < len(names[d])]
        board.tables.append(averages)
    if costs:
        board.costs = cost_frame(records)
        for dataset in sorted(names):
            board.tables.append(_cost_table(board.costs, dataset))
    if metrics:
        for method in selections:
            frame = metric_frame(records, selected[selected["selection"] == method])
            for dataset in sorted(names):
                board.tables.append(_metric_table(frame, dataset, method))
    return board


def leaderboard_from_collection(coll, **kwargs) -> Leaderboard:
    return build_leaderboard(coll.records, coll.domains, summary=coll.summary(), **kwargs)


def diverged_notes(records: pd.DataFrame) -> dict[str, list[str]]:
    """Per dataset, a note for each algorithm with runs whose loss became non-finite: like DomainBed, their
    checkpoints stay in model selection (a diverged run rarely wins, but dropping it would change the
    protocol), and the table says so."""
    if "diverged" not in records or not records["diverged"].notna().any():
        return {}
    runs = records.drop_duplicates(["run", "dataset", "algorithm"]) if "run" in records else records
    bad = records[records["diverged"].notna()].drop_duplicates(["run", "dataset", "algorithm"]) \
        if "run" in records else records[records["diverged"].notna()]
    notes: dict[str, list[str]] = {}
    total = runs.groupby(["dataset", "algorithm"]).size()
    for (dataset, algorithm), n in bad.groupby(["dataset", "algorithm"]).size().items():
        notes.setdefault(dataset, []).append(
            f"{algorithm}: {n} of {total[(dataset, algorithm)]} runs diverged (non-finite loss); their checkpoints "
            "stay in model selection, as in DomainBed")
    return notes


def held_out_envs(records: pd.DataFrame, n_envs: Mapping[str, int]) -> dict[str, list[int]]:
    """Per dataset, the domains some single-test-env run holds out; all domains when none does.

    A sweep that holds out only some domains (a quick demo) gets columns for those alone instead of a
    row of X cells; the table says which domains are left out and that its Avg covers only these.
    """
    singles = records[records["n_test_envs"] == 1]
    held = singles.groupby("dataset")["test_env"].unique()
    return {d: sorted(int(e) for e in held[d]) if d in held.index else list(range(n)) for d, n in n_envs.items()}


def _dataset_table(sel: pd.DataFrame, method: str, dataset: str, domain_names: list[str], envs: list[int],
                   error: str) -> Table:
    rows = algorithm_order(sel["algorithm"])
    cols = [domain_names[env] for env in envs]
    expected = int(sel["trial_seed"].nunique())
    stats = _summarise(sel.assign(acc=sel["test_acc"] * 100), ["algorithm", "test_env"], "acc", error)
    stats = {(a, int(t)): (m, e, int(n)) for a, t, m, n, e in stats[["algorithm", "test_env", "mean", "n", "error"]]
             .itertuples(index=False, name=None)}
    failed = sel[sel["test_acc"].isna()]
    reasons = {(a, int(t)): _cell_reason(sub) for (a, t), sub in failed.groupby(["algorithm", "test_env"], sort=False)}
    cells: dict[tuple[str, str], Cell] = {}
    for alg in rows:
        means, ns = [], []
        for env, col in zip(envs, cols):
            m, e, n = stats.get((alg, env), (None, None, 0))
            cells[(alg, col)] = Cell(m, e, n, expected, reasons.get((alg, env)))
            means.append(m)
            ns.append(n)
        if all(m is not None for m in means) and means:
            cells[(alg, "Avg")] = Cell(float(np.mean(means)), None, min(ns), expected)
        else:
            missing = [c for c, m in zip(cols, means) if m is None]
            cells[(alg, "Avg")] = Cell(None, None, 0, expected, f"no value for {', '.join(missing)}")
    table = Table("dataset", f"Dataset: {dataset}, model selection method: {METHODS[method]}", cols + ["Avg"], rows,
                  cells, selection=method, dataset=dataset)
    table.notes = _notes(table)
    left_out = [name for env, name in enumerate(domain_names) if env not in envs]
    if left_out:
        table.notes.insert(0, f"no run holds out {', '.join(left_out)}: those columns are left out, and Avg is "
                              f"over the {len(envs)} of {len(domain_names)} domains shown")
    return table


def _averages_table(sel: pd.DataFrame, method: str, names: Mapping[str, list[str]], error: str) -> Table:
    datasets = sorted(names)
    rows = algorithm_order(sel["algorithm"])
    n_envs = sel.groupby("dataset")["test_env"].nunique()
    per_trial = (sel.assign(acc=sel["test_acc"] * 100)
                 .groupby(["dataset", "algorithm", "trial_seed"], sort=False)["acc"].agg(["mean", "count"]).reset_index())
    complete = per_trial["count"].to_numpy() == per_trial["dataset"].map(n_envs).to_numpy()
    per_trial["trial_avg"] = np.where(complete, per_trial["mean"], np.nan)
    stats = _summarise(per_trial, ["dataset", "algorithm"], "trial_avg", error)
    stats = {(d, a): (m, e, int(n)) for d, a, m, n, e in stats[["dataset", "algorithm", "mean", "n", "error"]]
             .itertuples(index=False, name=None)}
    expected = sel.groupby("dataset")["trial_seed"].nunique().to_dict()
    incomplete = per_trial[~complete]
    ran = set(map(tuple, sel[["dataset", "algorithm"]].drop_duplicates().itertuples(index=False, name=None)))
    cells: dict[tuple[str, str], Cell] = {}
    for alg in rows:
        means = []
        for dataset in datasets:
            m, e, n = stats.get((dataset, alg), (None, None, 0))
            reason = None
            if (dataset, alg) not in ran:
                reason = "not run on this dataset"
            elif n < expected.get(dataset, 0):
                trials = incomplete[(incomplete["dataset"] == dataset) & (incomplete["algorithm"] == alg)]["trial_seed"]
                reason = f"{_trials_text(trials.tolist())}: no value for every domain (see the {dataset} table)"
            cells[(alg, dataset)] = Cell(m, e, n, int(expected.get(dataset, 0)), reason)
            means.append(m)
        if means and all(m is not None for m in means):
            cells[(alg, "Avg")] = Cell(float(np.mean(means)), None, min(cells[(alg, d)].n for d in datasets), 0)
        else:
            cells[(alg, "Avg")] = Cell(None, None, 0, 0, "a dataset has no value")
    table = Table("averages", f"Averages, model selection method: {METHODS[method]}", datasets + ["Avg"], rows, cells,
                  selection=method, column_datasets={d: d for d in datasets})
    table.notes = _notes(table)
    return table


def cost_frame(records: pd.DataFrame) -> pd.DataFrame:
    """Per dataset x algorithm: the mean over runs of each run's costs, and the number of runs."""
    keys = [k for k in COST_COLUMNS if k in records] + sorted(c for c in records if c.startswith("cost_"))
    if records.empty:
        return pd.DataFrame(columns=["dataset", "algorithm", "runs", *keys])
    ordered = records.sort_values(["run", "step"], kind="mergesort")
    g = ordered.groupby(["dataset", "algorithm", "run"], sort=False)
    how = {k: COST_COLUMNS[k][1] if k in COST_COLUMNS else "last" for k in keys}
    per_run = g.agg(how) if keys else g.size().to_frame("n")[[]]
    per_run = per_run.reset_index()
    out = per_run.groupby(["dataset", "algorithm"], sort=True)[keys].mean()
    out.insert(0, "runs", per_run.groupby(["dataset", "algorithm"], sort=True).size())
    return out.reset_index()


METRIC_PREFIX = "metric_"  # MetricMeter keys: a method's own numbers (pool size, guidance scale, ...)


def metric_frame(records: pd.DataFrame, selected: pd.DataFrame) -> pd.DataFrame:
    """Per dataset x algorithm: each ``metric_*`` key at the checkpoint one selection method chose,
    averaged over the selected (test domain, trial) groups; ``n`` = groups with a value."""
    keys = sorted(c for c in records if c.startswith(METRIC_PREFIX))
    if not keys or selected.empty:
        return pd.DataFrame(columns=["dataset", "algorithm", "n", *keys])
    singles = records[records["n_test_envs"] == 1][["dataset", "algorithm", "test_env", "trial_seed", "hparams_seed",
                                                     "step", *keys]]
    singles = singles.drop_duplicates(["dataset", "algorithm", "test_env", "trial_seed", "hparams_seed", "step"],
                                      keep="last")
    chosen = selected.dropna(subset=["step"]).astype({"step": "int64", "hparams_seed": "int64"})
    at = chosen[["dataset", "algorithm", "test_env", "trial_seed", "hparams_seed", "step"]].merge(
        singles, on=["dataset", "algorithm", "test_env", "trial_seed", "hparams_seed", "step"], how="left")
    g = at.groupby(["dataset", "algorithm"], sort=True)
    out = g[keys].mean()
    out.insert(0, "n", g[keys[0]].size())
    return out.reset_index()


def _metric_table(frame: pd.DataFrame, dataset: str, method: str) -> Table:
    sub = frame[frame["dataset"] == dataset]
    keys = [k for k in frame.columns if k.startswith(METRIC_PREFIX) and sub[k].notna().any()]
    cols = [k[len(METRIC_PREFIX):] for k in keys]
    rows = algorithm_order(sub["algorithm"])
    cells: dict[tuple[str, str], Cell] = {}
    for rec in sub.to_dict("records"):
        for k, col in zip(keys, cols):
            v = rec[k]
            cells[(rec["algorithm"], col)] = Cell(None if pd.isna(v) else float(v), None, int(rec["n"]), int(rec["n"]),
                                                  "not recorded" if pd.isna(v) else None)
    return Table("metrics", f"Dataset: {dataset}, metrics at the checkpoint {method} selects (mean over test domains "
                 "and trials)", cols, rows, cells, dataset=dataset, formats={c: "{:.4g}" for c in cols})


def _cost_label(key: str) -> tuple[str, str]:
    if key in COST_COLUMNS:
        return COST_COLUMNS[key][0], COST_COLUMNS[key][2]
    if key in COST_LABELS:
        return COST_LABELS[key]
    if key.startswith(REUSED):
        label, fmt = _cost_label("cost_" + key[len(REUSED):])
        return f"reused {label}", fmt
    return key[len("cost_"):].replace("_", " "), "{:.4g}"


def _cost_table(costs: pd.DataFrame, dataset: str) -> Table:
    sub = costs[costs["dataset"] == dataset]
    keys = [k for k in costs.columns if k not in ("dataset", "algorithm", "runs") and sub[k].notna().any()]
    labels = {k: _cost_label(k) for k in keys}
    cols = ["runs"] + [labels[k][0] for k in keys]
    rows = algorithm_order(sub["algorithm"])
    cells: dict[tuple[str, str], Cell] = {}
    for rec in sub.to_dict("records"):
        alg, runs = rec["algorithm"], int(rec["runs"])
        cells[(alg, "runs")] = Cell(float(runs), None, runs, runs)
        for k in keys:
            v = rec[k]
            cells[(alg, labels[k][0])] = Cell(None if pd.isna(v) else float(v), None, runs, runs,
                                             None if not pd.isna(v) else "no run recorded it")
    formats = {"runs": "{:.0f}", **{labels[k][0]: labels[k][1] for k in keys}}
    return Table("costs", f"Dataset: {dataset}, cost per run (mean over runs)", cols, rows, cells,
                 dataset=dataset, formats=formats)


# ---------------------------------------------------------------------------------------------------
# rendering


def format_cell(cell: Cell | None, style: str = "text", fmt: str | None = None) -> str:
    """'85.0 +/- 2.5' (text), '85.0 ± 2.5' (markdown/html), '85.0 $\\pm$ 2.5' (latex); '(n=k)' when short."""
    if cell is None or cell.mean is None or (isinstance(cell.mean, float) and math.isnan(cell.mean)):
        return "X" if fmt is None else "-"
    if fmt is not None:
        return fmt.format(cell.mean)
    pm = {"text": "+/-", "latex": "$\\pm$"}.get(style, "±")
    s = f"{cell.mean:.1f}"
    if cell.error is not None and not math.isnan(cell.error):
        s += f" {pm} {cell.error:.1f}"
    if 0 < cell.n < cell.expected:
        s += f" (n={cell.n})"
    return s


def _grid(table: Table, style: str) -> list[list[str]]:
    return [[format_cell(table.cells.get((r, c)), style, table.formats.get(c)) for c in table.columns]
            for r in table.rows]


def error_description(error: str) -> str:
    return f"Error bars: {ERRORS[error]}. (n=k): k trials when the dataset has more; X: no value (see notes)."


def sections(board: Leaderboard) -> Iterator[tuple[str | None, Table]]:
    """Each table with its section heading (one per selection method, then costs) where a section starts."""
    previous = None
    for table in board.tables:
        head = (f"Model selection: {METHODS[table.selection]}" if table.selection else
                "Metrics at the selected checkpoint" if table.kind == "metrics" else "Cost per run")
        yield (head if head != previous else None), table
        previous = head


def render_text(board: Leaderboard) -> str:
    out = []
    if board.summary:
        out.append(board.summary)
    out.append(error_description(board.error))
    for table in board.tables:
        grid = [["Algorithm", *table.columns]] + [[r, *row] for r, row in zip(table.rows, _grid(table, "text"))]
        if table.kind in ("costs", "metrics"):  # many unlike columns: each as wide as it needs
            widths = [max(len(row[i]) for row in grid) for i in range(len(grid[0]))]
        else:  # DomainBed's look: one width for every column
            width = max([25 if table.kind == "averages" else 20] + [len(s) for row in grid for s in row])
            widths = [width] * len(grid[0])
        out.append("")
        out.append(f"-------- {table.title}")
        for row in grid:
            out.append("  ".join(s.ljust(w) for s, w in zip(row, widths)).rstrip())
        for note in table.notes:
            out.append(f"  * {note}")
    return "\n".join(out) + "\n"


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def render_markdown(board: Leaderboard) -> str:
    out = ["# Leaderboard", ""]
    if board.summary:
        out += [board.summary, ""]
    out += [error_description(board.error)]
    for head, table in sections(board):
        if head:
            out += ["", f"## {head}"]
        sub = f"Dataset: {table.dataset}" if table.dataset else "Averages"
        out += ["", f"### {sub}", ""]
        out.append("| " + " | ".join(_md_escape(s) for s in ["Algorithm", *table.columns]) + " |")
        out.append("|" + "|".join([":---"] + ["---:"] * len(table.columns)) + "|")
        for r, row in zip(table.rows, _grid(table, "markdown")):
            out.append("| " + " | ".join(_md_escape(s) for s in [r, *row]) + " |")
        if table.notes:
            out.append("")
            out += [f"- {_md_escape(n)}" for n in table.notes]
    return "\n".join(out) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(s: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in s)


def render_latex(board: Leaderboard) -> str:
    out = ["\\documentclass{article}", "\\usepackage{booktabs}", "\\usepackage{adjustbox}", "\\begin{document}",
           "\\section{Full results}"]
    if board.summary:
        out.append(f"% {board.summary}")
    out.append(f"% {error_description(board.error)}")
    for head, table in sections(board):
        if head:
            out += ["", f"\\subsection{{{latex_escape(head)}}}"]
        out += ["", f"\\subsubsection{{{latex_escape(table.dataset or 'Averages')}}}", ""]
        out += ["\\begin{center}", "\\adjustbox{max width=\\textwidth}{%",
                "\\begin{tabular}{l" + "c" * len(table.columns) + "}", "\\toprule"]
        out.append(" & ".join("\\textbf{" + latex_escape(s) + "}" for s in ["Algorithm", *table.columns]) + " \\\\")
        out.append("\\midrule")
        for r, row in zip(table.rows, _grid(table, "latex")):
            out.append(" & ".join([latex_escape(r), *row]) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}}", "\\end{center}"]
        out += [f"% {n}" for n in table.notes]
    out += ["", "\\end{document}"]
    return "\n".join(out) + "\n"


def long_form(board: Leaderboard) -> pd.DataFrame:
    """One row per cell: table, selection, dataset, algorithm, column, mean, error, n, expected_n, reason."""
    rows = []
    for table in board.tables:
        for r in table.rows:
            for c in table.columns:
                cell = table.cells.get((r, c)) or Cell(None)
                dataset = table.dataset if table.kind != "averages" else table.column_datasets.get(c)

                def num(x):
                    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 6)

                rows.append({"table": table.kind, "selection": table.selection, "dataset": dataset, "algorithm": r,
                             "column": c, "mean": num(cell.mean), "error": num(cell.error), "n": int(cell.n),
                             "expected_n": int(cell.expected), "reason": cell.reason})
    return pd.DataFrame(rows, columns=LONG_COLUMNS)


def render_csv(board: Leaderboard) -> str:
    buf = io.StringIO()
    long_form(board).to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()


def render_json(board: Leaderboard) -> str:
    df = long_form(board).astype(object)
    records = df.where(df.notna(), None).to_dict("records")
    return json.dumps(records, indent=1) + "\n"


RENDERERS = {"text": render_text, "markdown": render_markdown, "latex": render_latex, "csv": render_csv,
             "json": render_json}


def render(board: Leaderboard, fmt: str = "text") -> str:
    """Text formats; ``html`` is the report's (``report.render_html``; report imports tables, not back)."""
    if fmt == "html":
        raise ValueError("html is rendered by domainfusion_bench.report.render_html")
    if fmt not in RENDERERS:
        raise ValueError(f"unknown format {fmt!r}; choices: {', '.join(FORMATS)}")
    return RENDERERS[fmt](board)
