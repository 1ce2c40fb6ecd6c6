"""Cost tables (per run: wall time, images/s, peak memory, ``cost_*`` keys) and metric tables (a method's
``metric_*`` numbers at the selected checkpoint)."""

from __future__ import annotations

import pandas as pd

from domainfusion_bench.tables.model import Cell, Table, algorithm_order

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
    "cost_ld_nfe": ("distillation NFEs", "{:.0f}"),
    "cost_total_nfe": ("NFEs in all", "{:.0f}"),
    "cost_generation_seconds": ("generation (s)", "{:.1f}"),
    "cost_diffusion_train_seconds": ("diffusion train (s)", "{:.1f}"),
}
REUSED = "cost_reused_"  # work done once (by another run or an earlier attempt) and reused by this run


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
    if "cost_ld_nfe" in per_run:  # total denoiser work: generation NFEs + DomainFusion's distillation calls
        parts = [k for k in ("cost_nfe", "cost_ld_nfe") if k in per_run]
        per_run["cost_total_nfe"] = per_run[parts].sum(axis=1, min_count=1)
        keys.insert(max(keys.index(k) for k in parts) + 1, "cost_total_nfe")
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
