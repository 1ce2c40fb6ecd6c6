"""``synthetic-pacs``: a generated JPEG folder dataset in PACS's shape, for benchmarks without real data.

Four domains and seven classes with PACS's names, 227x227 RGB JPEGs in DomainBed's folder layout, so
it goes through exactly the code path real PACS does (folder listing, JPEG decode, transforms). A class
is a shape; a domain is a drawing style (painted, cartoon, photo-like texture, sketch), so the images
also carry a small, learnable domain shift. Written once under ``<data_dir>/synthetic_pacs``; a
``.complete`` file records how it was made, and a different request rewrites it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from domainfusion_bench.data.base import register_dataset
from domainfusion_bench.data.folder import PACS, ImageFolderDataset
from domainfusion_bench.errors import DfbenchError

SIZE = 227  # PACS's image size
CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
DEFAULT_PER_CLASS = 50  # images per (domain, class); PACS has ~360 on average
MARKER = ".complete"


def _shape_points(cls: int, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """A polygon per class: circle-ish (many sides), triangle, square, pentagon, star, cross, bar."""
    if cls == 4:  # star
        pts = [(r if k % 2 == 0 else r * 0.45, k * math.pi / 5) for k in range(10)]
    elif cls == 5:  # cross
        a, b = r, r * 0.35
        corners = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a), (-b, -a), (-b, -b), (-a, -b), (-a, b), (-b, b), (-b, a)]
        pts = [(math.hypot(x, y), math.atan2(y, x)) for x, y in corners]
    elif cls == 6:  # bar
        corners = [(r, r * 0.3), (r, -r * 0.3), (-r, -r * 0.3), (-r, r * 0.3)]
        pts = [(math.hypot(x, y), math.atan2(y, x)) for x, y in corners]
    else:
        sides = {0: 24, 1: 3, 2: 4, 3: 5}[cls]
        pts = [(r, 2 * math.pi * k / sides) for k in range(sides)]
    return [(cx + d * math.cos(t + angle), cy + d * math.sin(t + angle)) for d, t in pts]


def _background(domain: str, rng: np.random.RandomState) -> Image.Image:
    if domain == "photo":  # smooth random texture: realistic JPEG sizes and decode cost
        noise = rng.randint(0, 256, (SIZE // 8 + 1, SIZE // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(noise).resize((SIZE, SIZE), Image.BICUBIC)
        grain = rng.randint(-20, 21, (SIZE, SIZE, 3))
        return Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + grain, 0, 255).astype(np.uint8))
    if domain == "art_painting":  # overlapping coloured brush blobs, blurred
        img = Image.new("RGB", (SIZE, SIZE), tuple(int(c) for c in rng.randint(60, 200, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(25):
            x, y = rng.randint(0, SIZE, 2)
            w, h = rng.randint(10, 70, 2)
            draw.ellipse([x - w, y - h, x + w, y + h], fill=tuple(int(c) for c in rng.randint(0, 256, 3)))
        return img.filter(ImageFilter.GaussianBlur(3))
    if domain == "cartoon":
        return Image.new("RGB", (SIZE, SIZE), tuple(int(c) for c in rng.randint(150, 256, 3)))
    return Image.new("RGB", (SIZE, SIZE), (255, 255, 255))  # sketch


def draw_image(domain: str, cls: int, rng: np.random.RandomState) -> Image.Image:
    img = _background(domain, rng)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.2, 0.4) * SIZE
    cx, cy = rng.uniform(r, SIZE - r, 2)
    pts = _shape_points(cls, cx, cy, r, rng.uniform(0, 2 * math.pi))
    colour = tuple(int(c) for c in rng.randint(0, 256, 3))
    if domain == "sketch":
        draw.line(pts + pts[:1], fill=(0, 0, 0), width=int(rng.randint(2, 5)))
    elif domain == "cartoon":
        draw.polygon(pts, fill=colour, outline=(0, 0, 0), width=6)
    else:
        draw.polygon(pts, fill=colour)
    return img


def generate(root: str | Path, per_class: int = DEFAULT_PER_CLASS, seed: int = 0) -> Path:
    """Write ``root/<domain>/<class>/<k>.jpg`` (4 x 7 x per_class images) unless it is there already."""
    root = Path(root)
    wanted = {"per_class": per_class, "seed": seed, "size": SIZE}
    marker = root / MARKER
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return root
    if per_class < 1:
        raise DfbenchError(f"synthetic-pacs needs at least 1 image per class, got {per_class}")
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for d, domain in enumerate(PACS.DOMAINS):
        for c, cls in enumerate(CLASSES):
            folder = tmp / domain / cls
            folder.mkdir(parents=True)
            rng = np.random.RandomState(seed * 1000 + d * 10 + c)
            for k in range(per_class):
                draw_image(domain, c, rng).save(folder / f"{cls}_{k:05d}.jpg", quality=90)
    (tmp / MARKER).write_text(json.dumps(wanted))
    shutil.rmtree(root, ignore_errors=True)  # a different earlier request, or a partial one
    os.replace(tmp, root)
    return root


@register_dataset("synthetic-pacs")
class SyntheticPACS(ImageFolderDataset):
    SUBDIR = "synthetic_pacs"
    DOMAINS = PACS.DOMAINS
    NEEDS = "nothing (generated on first use under <data_dir>/synthetic_pacs)"

    @classmethod
    def from_data_dir(cls, data_dir: str | Path) -> "SyntheticPACS":
        root = Path(data_dir) / cls.SUBDIR
        if not (root / MARKER).exists():
            generate(root)
        return cls(root)
