"""The embedded DigitStyles benchmark: deterministic, disjoint domains, pinned statistics, a preview grid."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from domainfusion_bench.cli import main
from domainfusion_bench.data import get_dataset
from domainfusion_bench.data import embedded
from domainfusion_bench.data.preview import grid_shape, preview_grid
from domainfusion_bench.errors import DfbenchError


@pytest.fixture(scope="module")
def styles():
    return get_dataset("DigitStyles", "unused")


@pytest.fixture(scope="module")
def styles_v1():
    return get_dataset("DigitStyles-v1", "unused")


def test_construction_is_deterministic(styles):
    again = get_dataset("DigitStyles", "unused")
    for a, b in zip(styles.envs, again.envs):
        assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])


def test_each_real_image_is_in_exactly_one_domain(monkeypatch):
    # draw every domain as its bare digit mask: the domains must then tile the 1,797 digits exactly once
    monkeypatch.setattr(embedded.DigitStyles, "styles", lambda self: (lambda d, rng: d.repeat(1, 3, 1, 1),) * 4)
    ds = embedded.DigitStyles()
    x, y = embedded._digits(box=24, size=32)
    x = ((x - 0.15) / 0.45).clamp(0, 1)
    assert sum(ds.sizes()) == len(x) == 1797
    for i, env in enumerate(ds.envs):
        assert torch.equal(env.tensors[0][:, :1], x[i::4]) and torch.equal(env.tensors[1], y[i::4])


def _stats(ds):
    out = {}
    for name, env in zip(ds.domains, ds.envs):
        x = env.tensors[0]
        border = torch.cat([x[:, :, :2].flatten(1), x[:, :, -2:].flatten(1)], 1).mean(1)
        light_ground = int((border > x.mean(dim=(1, 2, 3))).sum())  # polarity: dark strokes on a light ground
        out[name] = (x.mean(dim=(0, 2, 3)).tolist(), light_ground, len(x))
    return out


# Changing any of these changes the benchmark: raise the dataset's VERSION, keep the old construction
# registered under a new name (as DigitStyles-v1), and re-measure datasets/README.md's table.
PINNED_V2 = {
    "poster": ([0.5009, 0.4984, 0.5055], 239, 450),  # light on dark or dark on light, about half each
    "crayon": ([0.6894, 0.6834, 0.6753], 449, 449),  # dark strokes on light paper
    "stencil": ([0.4736, 0.4784, 0.4717], 213, 449),  # both polarities
    "chalk": ([0.2666, 0.2682, 0.2712], 0, 449),  # light strokes on a dark board
}
PINNED_V1 = {
    "plain": ([0.1706, 0.1706, 0.1706], 0, 450),
    "inverted": ([0.5674, 0.5653, 0.5777], 449, 449),
    "painted": ([0.7468, 0.7462, 0.7491], 449, 449),
    "sketch": ([0.8022, 0.8022, 0.8393], 449, 449),
}


@pytest.mark.parametrize("which", ["v2", "v1"])
def test_domain_statistics_are_pinned(which, styles, styles_v1):
    ds, pinned = (styles, PINNED_V2) if which == "v2" else (styles_v1, PINNED_V1)
    stats = _stats(ds)
    assert list(stats) == list(pinned)
    for name, (means, light_ground, n) in pinned.items():
        got_means, got_light, got_n = stats[name]
        assert got_means == pytest.approx(means, abs=1e-3), name
        assert (got_light, got_n) == (light_ground, n), name


def test_versions_and_names_are_distinct(styles, styles_v1):
    assert (type(styles).VERSION, type(styles_v1).VERSION, embedded.RotatedDigits.VERSION) == (2, 1, 1)
    assert not set(styles.domains) & set(styles_v1.domains)  # a table mixing the two shows 8 columns
    assert styles.input_shape == styles_v1.input_shape == (3, 32, 32)
    for env in styles.envs:
        x = env.tensors[0]
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and 0 <= x.min() and x.max() <= 1


def test_preview_command_writes_a_png_of_the_expected_size(tmp_path, capsys):
    out = tmp_path / "sub" / "grid.png"
    main(["datasets", "preview", "DigitStyles", "--out", str(out), "--scale", "1"])
    assert "rows poster, crayon, stencil, chalk" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.mode == "RGB" and im.size[::-1] == grid_shape(4, columns=10, size=32, scale=1) == (138, 342)
    with pytest.raises(SystemExit):
        main(["datasets", "preview", "DigitStyles", "--out", str(tmp_path / "grid.jpg")])
    assert "give a path ending in .png" in capsys.readouterr().err


def test_preview_grid_shows_each_class_in_order(styles):
    grid = preview_grid(styles, columns=3, size=32, scale=1)
    assert grid.shape == (3, *grid_shape(4, columns=3, scale=1))
    # row 2 (stencil), column 1 is stencil's first image of class 1
    first = next(k for k in range(len(styles.envs[2])) if int(styles.envs[2][k][1]) == 1)
    tile = grid[:, 2 + 2 * 34: 2 + 2 * 34 + 32, 2 + 34: 2 + 34 + 32]
    assert torch.allclose(tile, styles.envs[2][first][0], atol=1e-6)
    with pytest.raises(DfbenchError, match="positive"):
        preview_grid(styles, columns=0)
