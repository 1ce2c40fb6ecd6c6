"""A picture of a dataset: one row per domain, one column per class (that class's first image there).

``dfbench datasets preview DigitStyles --out grid.png`` writes it; datasets/README.md shows the grid of
the embedded datasets made this way.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF
from torchvision.utils import make_grid, save_image

from domainfusion_bench.data.base import MultiDomainDataset
from domainfusion_bench.errors import DfbenchError

PAD = 2


def _to_rgb01(x) -> torch.Tensor:
    """A raw example (float tensor in [0, 1], uint8 tensor, or PIL image) as float RGB [3, H, W] in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        x = TF.to_tensor(x)
    elif x.dtype == torch.uint8:
        x = x.float() / 255
    x = x.float().clamp(0, 1)
    return x.expand(3, -1, -1) if x.shape[0] == 1 else x


def _first_of_each_class(env, num_classes: int, limit: int = 2000) -> list[int | None]:
    """Index of each class's first example in ``env`` (None where none turns up in the first ``limit``)."""
    found: list[int | None] = [None] * num_classes
    for k in range(min(len(env), limit)):
        y = int(env[k][1])
        if found[y] is None:
            found[y] = k
            if all(f is not None for f in found):
                break
    return found


def preview_grid(dataset: MultiDomainDataset, columns: int = 10, size: int = 32, scale: int = 2) -> torch.Tensor:
    """[3, H, W] grid in [0, 1]: domain rows; the first ``columns`` classes, each image resized to ``size``."""
    if columns < 1 or size < 1 or scale < 1:
        raise DfbenchError(f"columns, size and scale must be positive integers, got {columns}, {size}, {scale}")
    columns = min(columns, dataset.num_classes)
    tiles = []
    for env in dataset.envs:
        for k in _first_of_each_class(env, dataset.num_classes)[:columns]:
            tile = torch.full((3, size, size), 0.5) if k is None else _to_rgb01(env[k][0])
            tiles.append(F.interpolate(tile[None], size=(size, size), mode="bilinear", antialias=True)[0].clamp(0, 1))
    grid = make_grid(torch.stack(tiles), nrow=columns, padding=PAD, pad_value=1.0)
    return F.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]


def grid_shape(n_domains: int, columns: int = 10, size: int = 32, scale: int = 2) -> tuple[int, int]:
    """(height, width) in pixels of the PNG ``write_preview`` makes."""
    return ((size + PAD) * n_domains + PAD) * scale, ((size + PAD) * columns + PAD) * scale


def write_preview(dataset: MultiDomainDataset, out: str | Path, columns: int = 10, size: int = 32,
                  scale: int = 2) -> Path:
    """Save ``preview_grid`` as a PNG at ``out`` (folders made as needed); returns the path."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise DfbenchError(f"--out {out}: the preview is a PNG file, give a path ending in .png")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(preview_grid(dataset, columns, size, scale), out)
    return out
