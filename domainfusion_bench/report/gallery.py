"""The page's "Generated images": per (dataset, algorithm) one run's ``previews/`` (``runfiles.previews``).

Strips of the same sources and seeds (a group) stand in one grid: the source images first (img2img),
then a row per guidance level (an +OG row: unguided, round 1, ..., the training images), each image with
the validity judge's verdict under it and a red frame when it judged the image invalid. Strips toward
a held-out domain (oracle rows) say so.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from domainfusion_bench import runfiles
from domainfusion_bench.report.styles import Style, marker_svg
from domainfusion_bench.tables.model import algorithm_order

esc = html.escape
OG_LABELS = {"unguided": "unguided", "distilled": "guided: distilled classifier"}


def tiles(png: Path, n: int) -> list[str]:
    """The ``n`` images of a strip PNG (side by side, no padding) as base64 PNGs."""
    from PIL import Image

    strip = Image.open(png)
    w = strip.width // max(n, 1)
    out = []
    for k in range(n):
        buf = io.BytesIO()
        strip.crop((k * w, 0, (k + 1) * w, strip.height)).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def _img(data: str, alt: str, cls: str = "") -> str:
    return f'<img class="tile{(" " + cls) if cls else ""}" alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def _row(label: str, images: list[str], valid: list[bool] | None, alt: str) -> str:
    cells = []
    for k, data in enumerate(images):
        if valid is None:
            cls, mark = "", '<span class="unjudged">not judged</span>'
        elif valid[k]:
            cls, mark = "valid", '<span class="ok">valid</span>'
        else:
            cls, mark = "invalid", '<span class="bad">invalid</span>'
        cells.append(f"<td>{_img(data, f'{alt} {k + 1}', cls)}<br>{mark}</td>")
    return f'<tr><th scope="row">{esc(label)}</th>' + "".join(cells) + "</tr>"


def _og_label(og: str | None) -> str:
    if og is None:
        return "generated"
    return OG_LABELS.get(og, f"guided: round {og[5:]}" if og.startswith("round") else og)


def _group(folder: Path, strips: list[dict]) -> str:
    first = strips[0]
    kind = first.get("kind", "unknown")
    what = {"img2img": "img2img: each image made from the source image above it",
            "pure": "pure samples: drawn from noise, no source image"}.get(kind, "kind not recorded")
    oracle = first.get("oracle_target")
    head = (f'<p class="strip-head"><b>{esc(str(first.get("stage", "?")))}</b>, for training domain '
            f'<b>{esc(str(first.get("domain", "?")))}</b>'
            + (f', toward <b>{esc(str(first["target"]))}</b>' if first.get("target") else "")
            + f' &middot; <span class="kind">{esc(what)}</span>'
            + (' &middot; <span class="oracle">ORACLE: toward a held-out domain (not a DG result)</span>'
               if oracle else "") + "</p>")
    rows = []
    if first.get("sources_file") and (folder / first["sources_file"]).exists():
        rows.append(_row("source", tiles(folder / first["sources_file"], first["n"]), None, "source image")
                    .replace('<span class="unjudged">not judged</span>', '<span class="unjudged">real</span>'))
    for s in strips:
        if (folder / s["file"]).exists():
            label = _og_label(s.get("og"))
            if s.get("guidance") and s.get("og") is None:
                label += " (guided: " + ", ".join(s["guidance"]) + ")"
            rows.append(_row(label, tiles(folder / s["file"], s["n"]), s.get("valid"), label))
    return head + '<div class="scroll"><table class="strips">' + "".join(rows) + "</table></div>"


def _legacy(folder: Path) -> list[str]:
    """Runs from before index.json: their strips, said to be without metadata."""
    parts = []
    for png in sorted(folder.glob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        parts.append(f'<figure><img class="strip" alt="{esc(png.stem)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{esc(png.stem)} (no metadata: written before previews/index.json)"
                     "</figcaption></figure>")
    return parts


def preview_gallery(root: str | Path, per_algorithm: int = 1, styles: dict[str, Style] | None = None) -> str:
    """HTML of generated images of the runs below ``root`` (one run per dataset and algorithm). Empty
    when no run wrote previews."""
    runs: dict[tuple[str, str], list[Path]] = {}
    for folder in sorted(Path(root).rglob(runfiles.PREVIEWS)):
        if not folder.is_dir():
            continue
        records, _ = runfiles.read_records(folder.parent / runfiles.RESULTS)
        args = records[0].get("args", {}) if records else {}
        runs.setdefault((str(args.get("dataset", "?")), str(args.get("algorithm", "?"))), []).append(folder)
    parts = []
    for dataset in sorted({d for d, _ in runs}):
        for alg in algorithm_order(a for d, a in runs if d == dataset):
            for folder in runs[(dataset, alg)][:per_algorithm]:
                records, _ = runfiles.read_records(folder.parent / runfiles.RESULTS)
                args = records[0].get("args", {}) if records else {}
                style = next((s for s in (styles or {}).values() if s.name.split(" [")[0] == alg), None)
                swatch = marker_svg(style) + " " if style else ""
                held, trial = esc(str(args.get("test_envs"))), esc(str(args.get("trial_seed")))
                parts.append(f'<h3 class="gallery-run">{swatch}{esc(alg)} on {esc(dataset)} '
                             f"(held out: {held}, trial {trial})</h3>")
                strips = runfiles.read_previews(folder.parent)
                if not strips:
                    parts += _legacy(folder)
                    continue
                groups: dict[str, list[dict]] = {}
                for s in strips:
                    groups.setdefault(s.get("group") or s["name"], []).append(s)
                parts += [_group(folder, g) for g in groups.values()]
    if not parts:
        return ""
    return ('<h2 id="generated">Generated images</h2>\n<p class="summary">Per run: what each generative stage '
            "made for a training domain. img2img rows show their source images first; oracle-guided rows show "
            "the same sources and seeds unguided and at each round of guidance. Under each image the "
            "validity judge's verdict (red frame: invalid, i.e. the judge does not see the intended class).</p>\n"
            + "\n".join(parts))
