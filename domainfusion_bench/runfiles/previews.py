"""``previews/``: a few generated images per generation stage, with what they are.

``previews/index.json`` lists the strips: per strip its ``file`` (the images side by side, no padding),
``sources_file`` (img2img: the source images, same order) or null (pure samples), and ``stage`` (base,
pool, ...), ``domain`` (the training domain the images are for), ``target`` (the domain or mix they were
generated toward), ``kind`` (img2img | pure), ``guidance`` (names of the guidance terms that steered
them), ``og`` (oracle-guided rows: "unguided", "round<k>" or "distilled", the guidance the strip was drawn
with; else null), ``oracle_target`` (generated toward a held-out domain: an oracle row's images),
``group`` (strips of the same sources and seeds share one: an +OG row's unguided and guided strips),
``valid`` (per image the validity judge's verdict, or null when none judged them) and ``n``.
Writers are the trainer (``training.setup.write_previews``); the reader is the HTML leaderboard.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from domainfusion_bench.runfiles.files import atomic_write_text, read_json
from domainfusion_bench.runfiles.names import PREVIEWS

INDEX = "index.json"
KINDS = ("img2img", "pure", "unknown")


@dataclass(eq=False)  # strips hold tensors: compare by identity
class PreviewStrip:
    images: Any  # uint8 [N, C, H, W] (torch or numpy)
    stage: str
    domain: str
    kind: str = "unknown"
    target: str | None = None
    sources: Any = None  # uint8 [N, C, H, W] for img2img
    guidance: list[str] = field(default_factory=list)
    og: str | None = None
    oracle_target: bool = False
    group: str | None = None
    valid: list[bool] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"preview kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.valid is not None and len(self.valid) != len(self.images):
            raise ValueError(f"{len(self.valid)} validity judgements for {len(self.images)} preview images")

    @property
    def name(self) -> str:
        return "-".join(p for p in (self.stage, self.domain, self.og) if p)


def _tile_png(images, path: Path) -> None:
    """The images side by side, without padding (the reader cuts them apart by width / n)."""
    import numpy as np
    from PIL import Image

    x = np.asarray(images.cpu() if hasattr(images, "cpu") else images)
    if x.dtype != np.uint8:
        raise ValueError(f"preview images must be uint8, got {x.dtype}")
    row = np.concatenate(list(x.transpose(0, 2, 3, 1)), axis=1)  # [H, N*W, C]
    row = row[..., 0] if row.shape[-1] == 1 else row
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    Image.fromarray(row).save(tmp)
    os.replace(tmp, path)


def write_previews(run_dir: Path, strips: list[PreviewStrip]) -> Path:
    """Write every strip's PNGs and the index (a second call adds strips of new names, keeps the rest)."""
    folder = Path(run_dir) / PREVIEWS
    folder.mkdir(exist_ok=True)
    old = read_previews(run_dir)
    entries = {e["name"]: e for e in old}
    for s in strips:
        if s.name in entries:
            continue
        # a group's strips share their sources: one file for them all
        file, src = f"{s.name}.png", (f"{s.group or s.name}.sources.png" if s.sources is not None else None)
        _tile_png(s.images, folder / file)
        if src and not (folder / src).exists():
            _tile_png(s.sources, folder / src)
        meta = {k: v for k, v in asdict(s).items() if k not in ("images", "sources")}
        entries[s.name] = {"name": s.name, "file": file, "sources_file": src, "n": len(s.images), **meta,
                           "valid": None if s.valid is None else [bool(v) for v in s.valid]}
    atomic_write_text(folder / INDEX, json.dumps({"version": 1, "strips": list(entries.values())}, indent=1) + "\n")
    return folder


def read_previews(run_dir: Path) -> list[dict[str, Any]]:
    """The index's strips (an empty list when the run wrote none or its index is unreadable)."""
    data = read_json(Path(run_dir) / PREVIEWS / INDEX)
    strips = data.get("strips") if isinstance(data, dict) else None
    return [s for s in strips if isinstance(s, dict) and "file" in s] if isinstance(strips, list) else []
