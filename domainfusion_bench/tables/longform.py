"""The long form of a leaderboard (one row per cell) and its csv / json renderers."""

from __future__ import annotations

import io
import json
import math

import pandas as pd

from domainfusion_bench.tables.model import Cell, Leaderboard

LONG_COLUMNS = ["table", "selection", "dataset", "algorithm", "column", "mean", "error", "n", "expected_n", "reason"]


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
