"""The collector's front door: run dirs -> leaderboard text / files, and the self-contained HTML page.

``leaderboard(root, fmt=...)`` returns the leaderboard of every run below ``root`` as a string;
``write_leaderboard(root, out)`` writes it (format from the suffix: .md, .tex, .csv, .json, .html, else
text). ``dfbench collect`` and ``make demo`` call these.

The HTML page (``page``) holds the same tables plus matplotlib plots (``plots``: accuracy per held-out
domain; accuracy vs cost, numbers placed apart by ``labels``) and the runs' generated images
(``gallery``), embedded as base64 PNGs: one file, nothing fetched from anywhere. ``styles`` gives every
row its colour and marker, the same in each of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from domainfusion_bench.collect import load_records
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.report.gallery import preview_gallery
from domainfusion_bench.report.page import render_html, row_names
from domainfusion_bench.report.styles import styles_for
from domainfusion_bench.selection import METHODS
from domainfusion_bench.tables import FORMATS, Leaderboard, leaderboard_from_collection, render

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
    if fmt != "html":
        return render(board, fmt)
    styles = styles_for(row_names(board))
    return render_html(board, gallery=preview_gallery(root, styles=styles), styles=styles)


def write_leaderboard(root: str | Path, out: str | Path, fmt: str | None = None, **kwargs) -> Path:
    """Write the leaderboard of ``root`` to ``out`` (format from ``fmt`` or the suffix); returns ``out``."""
    out = Path(out)
    text = leaderboard(root, format_for(out, fmt), **kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


__all__ = ["leaderboard", "write_leaderboard", "build", "render_html", "format_for", "preview_gallery", "styles_for"]
