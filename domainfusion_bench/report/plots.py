"""The page's plots, as base64 PNGs: accuracy per held-out domain (a dot plot: one row per algorithm, so
it reads the same at 5 or 40 rows) and accuracy against cost (numbered points, labels placed apart).
Every point wears its row's ``styles.Style``: the same colour and marker as in the legend and tables."""

from __future__ import annotations

import base64
import io
import math

import numpy as np

from domainfusion_bench.report.labels import place_labels
from domainfusion_bench.report.styles import Style
from domainfusion_bench.selection import METHODS
from domainfusion_bench.tables import Leaderboard, Table

DPI = 110
LABEL_PT = 7  # font size of the point numbers


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _value(cell, attr):
    v = getattr(cell, attr, None) if cell is not None else None
    return np.nan if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def plot_domains(table: Table, styles: dict[str, Style]) -> str:
    """One panel per column (held-out domain, then Avg), one row per algorithm: mean with its error bar."""
    plt = pyplot()
    rows, cols = table.rows, table.columns
    fig, axes = plt.subplots(1, len(cols), figsize=(min(2.0 + 1.6 * len(cols), 11), 0.9 + 0.24 * len(rows)),
                             sharey=True, squeeze=False)
    y = np.arange(len(rows))[::-1]  # first row on top, as in the table
    for ax, col in zip(axes[0], cols):
        for yi, alg in zip(y, rows):
            cell = table.cells.get((alg, col))
            st = styles[alg]
            ax.errorbar(_value(cell, "mean"), yi, xerr=_value(cell, "error"), fmt=st.marker, color=st.color,
                        markeredgecolor="#333", markeredgewidth=0.6, ecolor=st.color, capsize=2, markersize=6)
        ax.set_title(col, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylim(-0.7, len(rows) - 0.3)
    axes[0][0].set_yticks(y, [f"{styles[a].number}. {a}" for a in rows], fontsize=8)
    fig.supxlabel(f"test accuracy (%), {METHODS.get(table.selection, table.selection)}", fontsize=8)
    fig.suptitle(table.dataset, fontsize=10)
    fig.tight_layout()
    return png(fig)


def _number_points(ax, fig, pts, styles):
    """Numbers beside the points, placed apart, with a leader line when a number had to move away."""
    fig.canvas.draw()
    to_px = ax.transData.transform
    xy = [tuple(to_px((x, y))) for x, y, _ in pts]
    px = DPI / 72
    sizes = [(LABEL_PT * 0.62 * len(str(styles[a].number)) * px + 3, LABEL_PT * px + 2) for _, _, a in pts]
    bbox = ax.get_window_extent()
    boxes = place_labels(xy, sizes, (bbox.x0, bbox.y0, bbox.x1, bbox.y1), marker=4 * px)
    for (x, y, alg), (x0, y0), box in zip(pts, xy, boxes):
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        far = math.hypot(cx - x0, cy - y0) > 1.2 * max(box[2] - box[0], box[3] - box[1])
        ax.annotate(str(styles[alg].number), (x, y), xytext=((cx - x0) / px, (cy - y0) / px),
                    textcoords="offset points", ha="center", va="center", fontsize=LABEL_PT,
                    color="#222", arrowprops={"arrowstyle": "-", "color": "#888", "lw": 0.6} if far else None)


def plot_cost(board: Leaderboard, method: str, styles: dict[str, Style]) -> str | None:
    """Dataset-average accuracy of each algorithm against its mean run wall time (and generated images):
    one row of panels per dataset, each point numbered as in the legend."""
    costs = board.costs
    avg = next((t for t in board.tables if t.kind == "averages" and t.selection == method), None)
    if costs is None or costs.empty or avg is None or "wall_time" not in costs:
        return None
    xs = [("wall_time", "mean run wall time (s)", "log")]
    if "cost_generated_images" in costs and costs["cost_generated_images"].fillna(0).gt(0).any():
        costs = costs.assign(cost_generated_images=costs["cost_generated_images"].fillna(0.0))  # no key: none made
        xs.append(("cost_generated_images", "generated images per run", "symlog"))
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, ScalarFormatter

    datasets = sorted(costs["dataset"].unique())
    tall = 4.2 + 0.07 * max(0, len(styles) - 15)  # room for the numbers of many rows
    fig, axes = plt.subplots(len(datasets), len(xs), figsize=(5.2 * len(xs), tall * len(datasets)), squeeze=False)
    plotted = []
    for row, dataset in zip(axes, datasets):
        sub = costs[costs["dataset"] == dataset]
        for ax, (key, label, scale) in zip(row, xs):
            pts = []
            for rec in sub.to_dict("records"):
                cell = avg.cells.get((rec["algorithm"], dataset))
                if cell is None or cell.mean is None or rec.get(key) is None or np.isnan(rec[key]) \
                        or rec["algorithm"] not in styles:
                    continue
                st = styles[rec["algorithm"]]
                ax.errorbar(rec[key], cell.mean, yerr=_value(cell, "error"), fmt=st.marker, color=st.color,
                            markeredgecolor="#333", markeredgewidth=0.6, ecolor=st.color, capsize=2, markersize=6)
                pts.append((rec[key], cell.mean, rec["algorithm"]))
            values = sub[key].dropna()
            if scale == "log" and len(values) and (values > 0).all() and values.max() > 3 * values.min():
                ax.set_xscale("log")
            elif scale == "symlog" and len(values) and values.max() > 10:
                ax.set_xscale("symlog", linthresh=10)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # not 2x10^2 on a short log axis
            ax.margins(x=0.15, y=0.12)
            ax.set_xlabel(label, fontsize=8)
            ax.set_ylabel("dataset average test accuracy (%)", fontsize=8)
            ax.set_title(f"{dataset} ({METHODS[method]})", fontsize=9)
            ax.grid(alpha=0.3)
            plotted.append((ax, pts))
    fig.tight_layout()
    for ax, pts in plotted:
        if pts:
            _number_points(ax, fig, pts, styles)
    return png(fig)
