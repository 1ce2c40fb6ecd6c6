"""Renderers: text (close to DomainBed's collect_results), markdown, latex, and the format dispatch."""

from __future__ import annotations

import math
from typing import Iterator

from domainfusion_bench.selection import METHODS
from domainfusion_bench.tables.longform import render_csv, render_json
from domainfusion_bench.tables.model import ERRORS, Cell, Leaderboard, Table

FORMATS = ("text", "markdown", "latex", "csv", "json", "html")
READER_STYLES = ("markdown", "html")  # read by people: one trial is written "(n=1)"


def format_cell(cell: Cell | None, style: str = "text", fmt: str | None = None) -> str:
    """'85.0 +/- 2.5' (text), '85.0 ± 2.5' (markdown/html), '85.0 $\\pm$ 2.5' (latex); '(n=k)' when short;
    one trial: '47.5 (n=1)' in markdown/html, '47.5 +/- 0.0' in text/latex."""
    if cell is None or cell.mean is None or (isinstance(cell.mean, float) and math.isnan(cell.mean)):
        return "X" if fmt is None else "-"
    if fmt is not None:
        return fmt.format(cell.mean)
    pm = {"text": "+/-", "latex": "$\\pm$"}.get(style, "±")
    s = f"{cell.mean:.1f}"
    # one trial has no spread: html/markdown say "(n=1)" rather than a "± 0.0" that reads as no variance;
    # text and latex keep DomainBed's "+/- 0.0"
    one_trial = cell.n == 1 and style in READER_STYLES
    if cell.error is not None and not math.isnan(cell.error) and not one_trial:
        s += f" {pm} {cell.error:.1f}"
    if 0 < cell.n < cell.expected or one_trial:
        s += f" (n={cell.n})"
    return s


def _grid(table: Table, style: str) -> list[list[str]]:
    return [[format_cell(table.cells.get((r, c)), style, table.formats.get(c)) for c in table.columns]
            for r in table.rows]


def error_description(error: str, style: str = "text") -> str:
    one = " (n=1): one trial, so no error bar;" if style in READER_STYLES else ""
    return f"Error bars: {ERRORS[error]}. (n=k): k trials when the dataset has more;{one} X: no value (see notes)."


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
    out += [error_description(board.error, "markdown")]
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


RENDERERS = {"text": render_text, "markdown": render_markdown, "latex": render_latex, "csv": render_csv,
             "json": render_json}


def render(board: Leaderboard, fmt: str = "text") -> str:
    """Text formats; ``html`` is the report's (``report.render_html``; report imports tables, not back)."""
    if fmt == "html":
        raise ValueError("html is rendered by domainfusion_bench.report.render_html")
    if fmt not in RENDERERS:
        raise ValueError(f"unknown format {fmt!r}; choices: {', '.join(FORMATS)}")
    return RENDERERS[fmt](board)
