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
from domainfusion_bench.tables.build import build_leaderboard, leaderboard_from_collection
from domainfusion_bench.tables.longform import long_form
from domainfusion_bench.tables.model import Cell, Leaderboard, Table, error_bar
from domainfusion_bench.tables.render import (
    FORMATS, error_description, format_cell, render, render_text, sections,
)

__all__ = [
    "FORMATS", "Cell", "Leaderboard", "Table", "build_leaderboard", "error_bar", "error_description",
    "format_cell", "leaderboard_from_collection", "long_form", "render", "render_text", "sections",
]
