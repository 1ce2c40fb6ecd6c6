"""Selected results -> the leaderboard's accuracy tables (per dataset, averages) and, on request, its cost
and metric tables."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from domainfusion_bench.selection import METHODS, select_all
from domainfusion_bench.tables.costs import _cost_table, _metric_table, cost_frame, metric_frame
from domainfusion_bench.tables.model import (
    ERRORS, Cell, Leaderboard, Table, _cell_reason, _notes, _summarise, _trials_text, algorithm_order,
)


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
