"""The self-contained HTML page: a legend (one entry per algorithm: its number, marker and colour), the
plots, the tables (a swatch beside each row name; wide tables scroll inside their box with the
algorithm column kept in view) and the generated images. Nothing is fetched from anywhere."""

from __future__ import annotations

import html
import warnings

from domainfusion_bench.report.plots import plot_cost, plot_domains
from domainfusion_bench.report.styles import Style, marker_svg, styles_for
from domainfusion_bench.selection import METHODS
from domainfusion_bench.tables import Leaderboard, Table, error_description, format_cell, sections
from domainfusion_bench.tables.model import algorithm_order

esc = html.escape

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.3em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.05em;margin-bottom:.4em}
.scroll{max-width:100%;overflow-x:auto;margin:.3em 0 .6em 0}
table{border-collapse:separate;border-spacing:0;font-size:.88em}
th,td{padding:.25em .7em;text-align:right;border-bottom:1px solid #e4e4e4;white-space:nowrap;background:#fff}
thead th{border-bottom:2px solid #444;white-space:normal;vertical-align:bottom;min-width:4.5em}
th:first-child,td:first-child{text-align:left;position:sticky;left:0;z-index:1;border-right:1px solid #ddd}
table.costs,table.metrics{font-size:.8em}table.costs td,table.costs th{padding:.25em .5em}
td.best{font-weight:bold}td.missing{color:#b00}
.notes{font-size:.85em;color:#555;margin:0 0 1em 1em}.summary{color:#444}
img.plot{max-width:100%;height:auto;border:1px solid #eee;margin:.5em 0}
svg.swatch{vertical-align:-2px;margin-right:.35em}
ol.legend{columns:4 14em;list-style:none;padding:0;font-size:.88em;margin:.5em 0}
ol.legend li{break-inside:avoid;padding:.1em 0}.legend .num{display:inline-block;min-width:1.8em;color:#555}
.legend .fam{color:#777;font-size:.9em}
img.strip{image-rendering:pixelated;height:64px;width:auto}
figure{margin:.2em 0}figcaption{font-size:.8em;color:#555}
table.strips td{text-align:center;font-size:.75em;padding:.15em .2em;border-bottom:none}
table.strips th{font-weight:normal;font-size:.85em;min-width:9em}
img.tile{image-rendering:pixelated;width:48px;height:48px;border:3px solid #fff;display:block;margin:auto}
img.tile.valid{border-color:#cfe8cf}img.tile.invalid{border-color:#d00}
.ok{color:#2a7a2a}.bad{color:#d00;font-weight:bold}.unjudged{color:#888}
.strip-head{margin:.8em 0 .2em 0;font-size:.9em}.oracle{color:#a0522d;font-weight:bold}.kind{color:#444}
"""


def row_names(board: Leaderboard) -> list[str]:
    """Every row name of the board's tables, in the leaderboard's order (ERM first, tagged rows last)."""
    return algorithm_order(r for t in board.tables for r in t.rows)


def legend(styles: dict[str, Style]) -> str:
    items = [f'<li data-algorithm="{esc(s.name)}"><span class="num">{s.number}.</span>{marker_svg(s)}'
             f'{esc(s.name)} <span class="fam">({esc(s.family)})</span></li>' for s in styles.values()]
    return '<ol class="legend">' + "".join(items) + "</ol>"


def html_table(table: Table, styles: dict[str, Style]) -> str:
    out = [f'<div class="scroll"><table class="{esc(table.kind)}">', "<thead><tr><th>Algorithm</th>"
           + "".join(f"<th>{esc(c)}</th>" for c in table.columns) + "</tr></thead>", "<tbody>"]
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
        swatch = marker_svg(styles[r]) if r in styles else ""
        out.append(f"<tr><td>{swatch}{esc(r)}</td>" + "".join(tds) + "</tr>")
    out.append("</tbody></table></div>")
    if table.notes:
        out.append('<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in table.notes) + "</ul>")
    return "\n".join(out)


def _plots(board: Leaderboard, method: str, styles: dict[str, Style]) -> list[str]:
    parts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tables = [t for t in board.tables if t.kind == "dataset" and t.selection == method]
        if tables:
            parts.append(f"<h3>Accuracy per held-out domain ({esc(METHODS[method])})</h3>")
        for t in tables:
            parts.append(f'<img class="plot" alt="accuracy per held-out domain, {esc(t.dataset or "")}" '
                         f'src="data:image/png;base64,{plot_domains(t, styles)}">')
        cost = plot_cost(board, method, styles)
    if cost:
        parts.append("<h3>Accuracy vs cost</h3><p class=\"summary\">Each point is numbered as in the legend.</p>")
        parts.append(f'<img class="plot" alt="accuracy vs cost" src="data:image/png;base64,{cost}">')
    return parts


def render_html(board: Leaderboard, gallery: str = "", styles: dict[str, Style] | None = None) -> str:
    styles = styles or styles_for(row_names(board))
    method = board.selections[0] if board.selections else None
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             "<title>dfbench leaderboard</title>", f"<style>{CSS}</style></head><body>",
             "<h1>dfbench leaderboard</h1>"]
    if board.summary:
        parts.append(f'<p class="summary">{esc(board.summary)}</p>')
    parts.append(f'<p class="summary">{esc(error_description(board.error, "html"))} Bold: best in its column. '
                 "Hover an X for the reason.</p>")
    parts.append("<h2>Algorithms</h2><p class=\"summary\">A colour family per kind of algorithm, a marker per "
                 "variant; the same in every plot and table.</p>" + legend(styles))
    if method:
        parts.append("<h2>Plots</h2>")
        parts += _plots(board, method, styles)
    for head, table in sections(board):
        if head:
            parts.append(f"<h2>{esc(head)}</h2>")
        parts.append(f"<h3>{esc(f'Dataset: {table.dataset}' if table.dataset else 'Averages')}</h3>")
        parts.append(html_table(table, styles))
    if gallery:
        parts.append(gallery)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
