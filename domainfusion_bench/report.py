"""The collector's front door: run dirs -> leaderboard text / files, and the self-contained HTML page.

``leaderboard(root, fmt=...)`` returns the leaderboard of every run below ``root`` as a string;
``write_leaderboard(root, out)`` writes it (format from the suffix: .md, .tex, .csv, .json, .html, else
text). ``dfbench collect`` and ``make demo`` call these.

The HTML page holds the same tables plus matplotlib plots (accuracy per held-out domain; accuracy vs
cost), embedded as base64 PNGs: one file, nothing fetched from anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from domainfusion_bench.collect import load_records
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.selection import METHODS
from domainfusion_bench.tables import (
    FORMATS, Leaderboard, Table, error_description, format_cell, leaderboard_from_collection, render,
    sections,
)

SUFFIX_FORMATS = {".html": "html", ".htm": "html", ".md": "markdown", ".tex": "latex", ".csv": "csv",
                  ".json": "json", ".txt": "text"}


def format_for(out: str | Path | None, fmt: str | None) -> str:
    """The format to write: .html always means html; otherwise ``fmt``, else the suffix's, else text."""
    suffix = Path(out).suffix.lower() if out else ""
    if suffix in (".html", ".htm"):
        return "html"
    if fmt:
        if fmt not in FORMATS:
            raise DfbenchError(f"unknown format {fmt!r}; choices: {', '.join(FORMATS)}")
        return fmt
    return SUFFIX_FORMATS.get(suffix, "text")


def selections_for(selection: str | Sequence[str]) -> list[str]:
    if isinstance(selection, str):
        selection = list(METHODS) if selection == "all" else [selection]
    bad = [s for s in selection if s not in METHODS]
    if bad:
        raise DfbenchError(f"unknown selection method {bad[0]!r}; choices: {', '.join(METHODS)}, all")
    return list(selection)


def build(root: str | Path, selection: str | Sequence[str] = "all", error: str = "domainbed", costs: bool = False,
          include_incomplete: bool = False, fmt: str = "text", metrics: bool = False) -> Leaderboard:
    coll = load_records(root, include_incomplete=include_incomplete)
    if not coll.runs:
        if coll.incomplete_runs:
            raise DfbenchError(f"{len(coll.incomplete_runs)} run(s) under {root}, but none is done; "
                               "use --include-incomplete to collect them anyway")
        raise DfbenchError(f"no run results under {root} (no results.jsonl with a readable record)")
    # html shows accuracy vs cost, so it always needs the cost columns
    return leaderboard_from_collection(coll, selections=selections_for(selection), error=error,
                                       costs=costs or fmt == "html", metrics=metrics)


def leaderboard(root: str | Path, fmt: str = "text", selection: str | Sequence[str] = "all",
                error: str = "domainbed", costs: bool = False, include_incomplete: bool = False,
                metrics: bool = False) -> str:
    """The leaderboard of every run below ``root``, rendered in ``fmt``."""
    fmt = format_for(None, fmt)
    board = build(root, selection, error, costs, include_incomplete, fmt, metrics)
    return render_html(board, gallery=preview_gallery(root)) if fmt == "html" else render(board, fmt)


def write_leaderboard(root: str | Path, out: str | Path, fmt: str | None = None, **kwargs) -> Path:
    """Write the leaderboard of ``root`` to ``out`` (format from ``fmt`` or the suffix); returns ``out``."""
    out = Path(out)
    text = leaderboard(root, format_for(out, fmt), **kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


# ---------------------------------------------------------------------------------------------------
# HTML

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.3em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.05em;margin-bottom:.4em}
table{border-collapse:collapse;margin:.3em 0 .6em 0;font-size:.9em}
th,td{padding:.25em .8em;text-align:right;border-bottom:1px solid #e4e4e4;white-space:nowrap}
th{border-bottom:2px solid #444}th:first-child,td:first-child{text-align:left}
td.best{font-weight:bold}td.missing{color:#b00}
.notes{font-size:.85em;color:#555;margin:0 0 1em 1em}.summary{color:#444}
img{max-width:100%;height:auto;border:1px solid #eee;margin:.5em 0}
img.strip{image-rendering:pixelated;height:64px;width:auto}
figure{margin:.2em 0}figcaption{font-size:.8em;color:#555}
"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_domains(board: Leaderboard, method: str) -> str | None:
    """Grouped bars: accuracy per held-out domain, one panel per dataset, one bar per algorithm."""
    tables = [t for t in board.tables if t.kind == "dataset" and t.selection == method]
    if not tables:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(tables), 1, figsize=(9, 3.2 * len(tables)), squeeze=False)
    for ax, table in zip(axes[:, 0], tables):
        cols = table.columns  # domains + Avg
        width = 0.8 / max(len(table.rows), 1)
        x = np.arange(len(cols))
        for k, alg in enumerate(table.rows):
            cells = [table.cells.get((alg, c)) for c in cols]
            means = [c.mean if c and c.mean is not None else np.nan for c in cells]
            errs = [c.error if c and c.error is not None and not math.isnan(c.error) else np.nan for c in cells]
            ax.bar(x + (k - (len(table.rows) - 1) / 2) * width, means, width, label=alg)
            ax.errorbar(x + (k - (len(table.rows) - 1) / 2) * width, means, yerr=errs, fmt="none", ecolor="black",
                        capsize=2, linewidth=1)
        ax.set_xticks(x, cols, rotation=0)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{table.dataset} ({METHODS[method]})", fontsize=10)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def plot_cost(board: Leaderboard, method: str) -> str | None:
    """Dataset-average accuracy of each algorithm against its mean run wall time (and generated images)."""
    costs = board.costs
    avg = next((t for t in board.tables if t.kind == "averages" and t.selection == method), None)
    if costs is None or costs.empty or avg is None or "wall_time" not in costs:
        return None
    xs = [("wall_time", "mean run wall time (s)", "log")]
    if "cost_generated_images" in costs and costs["cost_generated_images"].fillna(0).gt(0).any():
        costs = costs.assign(cost_generated_images=costs["cost_generated_images"].fillna(0.0))  # no key: none made
        xs.append(("cost_generated_images", "generated images per run", "symlog"))
    plt = _pyplot()
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(1, len(xs), figsize=(6 * len(xs), 4), squeeze=False)
    markers = "osD^v<>ph*"
    datasets = sorted(costs["dataset"].unique())
    for ax, (key, label, scale) in zip(axes[0], xs):
        for i, dataset in enumerate(datasets):
            sub = costs[costs["dataset"] == dataset]
            pts = []
            for rec in sub.to_dict("records"):
                cell = avg.cells.get((rec["algorithm"], dataset))
                if cell is None or cell.mean is None or rec.get(key) is None or np.isnan(rec[key]):
                    continue
                pts.append((rec[key], cell.mean, cell.error or 0.0, rec["algorithm"]))
            if not pts:
                continue
            px, py, pe, names = zip(*pts)
            ax.errorbar(px, py, yerr=pe, fmt=markers[i % len(markers)], capsize=2, label=dataset)
            for x0, y0, name in zip(px, py, names):
                ax.annotate(name, (x0, y0), textcoords="offset points", xytext=(4, 3), fontsize=7)
        values = costs[key].dropna()
        if scale == "log" and len(values) and (values > 0).all() and values.max() > 3 * values.min():
            ax.set_xscale("log")
        elif scale == "symlog" and values.max() > 10:
            ax.set_xscale("symlog", linthresh=10)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.margins(x=0.15)
        ax.set_xlabel(label)
        ax.set_ylabel("dataset average test accuracy (%)")
        ax.set_title(METHODS[method], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def _html_table(table: Table) -> str:
    esc = html.escape
    out = ["<table>", "<thead><tr><th>Algorithm</th>" + "".join(f"<th>{esc(c)}</th>" for c in table.columns)
           + "</tr></thead>", "<tbody>"]
    best = {}
    if table.kind not in ("costs", "metrics"):
        for c in table.columns:
            vals = [(table.cells[(r, c)].mean, r) for r in table.rows
                    if (r, c) in table.cells and table.cells[(r, c)].mean is not None]
            if len(vals) > 1:
                best[c] = max(vals)[1]
    for r in table.rows:
        tds = []
        for c in table.columns:
            cell = table.cells.get((r, c))
            text = format_cell(cell, "html", table.formats.get(c))
            cls = "missing" if text in ("X", "-") else ("best" if best.get(c) == r else "")
            title = f' title="{esc(cell.reason)}"' if cell is not None and cell.reason else ""
            tds.append(f'<td class="{cls}"{title}>{esc(text)}</td>' if cls else f"<td{title}>{esc(text)}</td>")
        out.append(f"<tr><td>{esc(r)}</td>" + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    if table.notes:
        out.append('<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in table.notes) + "</ul>")
    return "\n".join(out)


def preview_gallery(root: str | Path, per_algorithm: int = 1) -> str:
    """HTML of generated images: for each (dataset, algorithm), the ``previews/`` strips of one run (a row
    of images per generation stage and training domain, written by the trainer). Empty when none exist."""
    from domainfusion_bench import runfiles

    seen: dict[tuple[str, str], int] = {}
    parts = []
    for folder in sorted(Path(root).rglob(runfiles.PREVIEWS)):
        records, _ = runfiles.read_records(folder.parent / runfiles.RESULTS)
        args = records[0].get("args", {}) if records else {}
        key = (str(args.get("dataset", "?")), str(args.get("algorithm", "?")))
        if seen.get(key, 0) >= per_algorithm:
            continue
        seen[key] = seen.get(key, 0) + 1
        parts.append(f"<h3>{html.escape(key[1])} on {html.escape(key[0])} "
                     f"(held out: {html.escape(str(args.get('test_envs')))}, trial {args.get('trial_seed')})</h3>")
        for png in sorted(folder.glob("*.png")):
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            parts.append(f'<figure><img class="strip" alt="{html.escape(png.stem)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{html.escape(png.stem)}</figcaption></figure>")
    if not parts:
        return ""
    return "<h2>Generated images</h2>\n<p class=\"summary\">Each strip: images a generative stage made for one " \
           "training domain (stage-domain), from the generation cache.</p>\n" + "\n".join(parts)


def render_html(board: Leaderboard, gallery: str = "") -> str:
    esc = html.escape
    method = board.selections[0] if board.selections else None
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>dfbench leaderboard</title>", f"<style>{CSS}</style></head><body>",
             "<h1>dfbench leaderboard</h1>"]
    if board.summary:
        parts.append(f'<p class="summary">{esc(board.summary)}</p>')
    parts.append(f'<p class="summary">{esc(error_description(board.error))} Bold: best in its column. '
                 "Hover an X for the reason.</p>")
    if method:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            domains_png = plot_domains(board, method)
            cost_png = plot_cost(board, method)
        parts.append("<h2>Plots</h2>")
        if domains_png:
            parts.append(f"<h3>Accuracy per held-out domain ({esc(METHODS[method])})</h3>")
            parts.append(f'<img alt="accuracy per held-out domain" src="data:image/png;base64,{domains_png}">')
        if cost_png:
            parts.append("<h3>Accuracy vs cost</h3>")
            parts.append(f'<img alt="accuracy vs cost" src="data:image/png;base64,{cost_png}">')
    for head, table in sections(board):
        if head:
            parts.append(f"<h2>{esc(head)}</h2>")
        parts.append(f"<h3>{esc(f'Dataset: {table.dataset}' if table.dataset else 'Averages')}</h3>")
        parts.append(_html_table(table))
    if gallery:
        parts.append(gallery)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


__all__ = ["leaderboard", "write_leaderboard", "build", "render_html", "format_for"]
