"""Embedded datasets: built deterministically from scikit-learn's bundled 8x8 handwritten digits.

No download, a few hundred images per domain, and still a real domain shift: the offline default
for the demo, the tests and the small diffusion models.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from domainfusion_bench.data.base import MultiDomainDataset, register_dataset

DATASET_SEED = 0


def _digits(box: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 sklearn digits, shuffled by a fixed seed, scaled into a ``box`` square centred in ``size``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).float().div(16.0).unsqueeze(1)  # [N, 1, 8, 8] in [0, 1]
    y = torch.from_numpy(bunch.target).long()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(DATASET_SEED))
    x = F.interpolate(x[order], size=(box, box), mode="bilinear", align_corners=False).clamp(0, 1)
    pad = (size - box) // 2
    return F.pad(x, (pad, size - box - pad, pad, size - box - pad)), y[order]


class EmbeddedDigits(MultiDomainDataset):
    SMALL_IMAGES = True
    CHECKPOINT_FREQ = 100
    CNN_WIDTH = 32  # a quarter of DomainBed's MNIST CNN: ~15x fewer FLOPs, still well above chance
    NEEDS = "nothing (embedded, built from scikit-learn's digits)"
    VERSION = 1  # raised whenever the construction changes, so results of two constructions never mix
    num_classes = 10
    classes = [str(d) for d in range(10)]

    def __init__(self, data_dir=None):  # data_dir unused: nothing to download
        self.domains = list(self.DOMAINS)
        self.envs = self.build()

    def build(self) -> list[TensorDataset]:
        raise NotImplementedError


@register_dataset("RotatedDigits")
class RotatedDigits(EmbeddedDigits):
    """RotatedMNIST's protocol on the embedded digits: six disjoint domains rotated 0..75 degrees."""

    DOMAINS = ("0", "15", "30", "45", "60", "75")
    input_shape = (1, 28, 28)

    def build(self):
        x, y = _digits(box=20, size=28)
        k = len(self.DOMAINS)
        envs = []
        for i, angle in enumerate(self.DOMAINS):
            xi = TF.rotate(x[i::k], float(angle), interpolation=InterpolationMode.BILINEAR, fill=0.0)
            envs.append(TensorDataset(xi, y[i::k]))
        return envs


class _DigitStylesBase(EmbeddedDigits):
    """RGB digits whose domains differ in appearance, not geometry; each digit image is used once."""

    input_shape = (3, 32, 32)
    SHARPEN = False

    def styles(self) -> tuple:
        """One function per domain: (digit intensity [N, 1, H, W], rng) -> RGB images [N, 3, H, W]."""
        raise NotImplementedError

    def build(self):
        x, y = _digits(box=24, size=32)
        if self.SHARPEN:  # solid strokes with crisp edges instead of the 8x8 digits' upscaled blur
            x = ((x - 0.15) / 0.45).clamp(0, 1)
        rng = np.random.RandomState(DATASET_SEED)
        k = len(self.DOMAINS)
        return [TensorDataset(style(x[i::k], rng).clamp(0, 1), y[i::k]) for i, style in enumerate(self.styles())]


@register_dataset("DigitStyles")
class DigitStyles(_DigitStylesBase):
    """Four RGB domains: each a surface style of its own, drawn with two of four stroke kinds.

    The stroke kinds are polarity (light on dark / dark on light) x stroke (filled / outline). Each
    domain draws half its images with one kind and half with the next, around a cycle:

    =======  ==========================  ======================================
    domain   stroke kinds                surface (colours random per image)
    =======  ==========================  ======================================
    poster   light filled, dark filled   flat colours
    crayon   dark filled, dark outline   strokes hatched in two colours, grainy paper
    stencil  dark outline, light outline ground with wide soft stripes
    chalk    light outline, light filled grainy strokes on a speckled board
    =======  ==========================  ======================================

    So whichever domain is held out, its two stroke kinds each appear in one training domain, but
    only under another surface, and in half the images: the held-out shift is one of surface
    (colour statistics and texture, what style mixing targets) plus a stroke kind drawn in an unseen
    surface. Version 1 (plain / inverted / painted / sketch, now ``DigitStyles-v1``) made each domain
    one pure combination; a small CNN stayed near chance on three of its four held-out domains.
    """

    VERSION = 2
    SHARPEN = True
    DOMAINS = ("poster", "crayon", "stencil", "chalk")

    def styles(self):
        return (_poster, _crayon, _stencil, _chalk)


@register_dataset("DigitStyles-v1")
class DigitStylesV1(_DigitStylesBase):
    """DigitStyles' first version, kept so old runs stay reproducible: plain, inverted, painted, sketch."""

    VERSION = 1
    DOMAINS = ("plain", "inverted", "painted", "sketch")

    def styles(self):
        return (_plain, _inverted, _painted, _sketch)


def _random_colors(n: int, rng: np.random.RandomState, low: float, high: float) -> torch.Tensor:
    return torch.from_numpy(rng.uniform(low, high, size=(n, 3, 1, 1))).float()


def _uniform(rng: np.random.RandomState, low: float, high: float, shape) -> torch.Tensor:
    return torch.from_numpy(rng.uniform(low, high, size=shape)).float()


def _stripes(n: int, h: int, w: int, rng, freq=(0.5, 1.2)) -> torch.Tensor:
    """[n, 1, h, w] in [0, 1]: sinusoidal stripes at a random angle, frequency and phase per image."""
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    angle = _uniform(rng, 0, np.pi, (n, 1, 1, 1))
    f = _uniform(rng, freq[0], freq[1], (n, 1, 1, 1))
    phase = _uniform(rng, 0, 2 * np.pi, (n, 1, 1, 1))
    return 0.5 + 0.5 * torch.sin(f * (xx * torch.cos(angle) + yy * torch.sin(angle)) + phase)


def _edges(d: torch.Tensor) -> torch.Tensor:
    """Outline of the strokes: Sobel gradient magnitude, in [0, 1]."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    gx, gy = F.conv2d(d, kx, padding=1), F.conv2d(d, kx.transpose(2, 3), padding=1)
    return (gx.pow(2) + gy.pow(2)).sqrt().clamp(0, 2) / 2


# Version 2 -------------------------------------------------------------------------------------------


def _outline(d: torch.Tensor) -> torch.Tensor:
    """A 2-3 px ring around the strokes (dilation minus erosion) over a faint fill, so the digit still reads."""
    ring = F.max_pool2d(d, 3, 1, 1) + F.max_pool2d(-d, 3, 1, 1)
    return torch.maximum(ring, 0.3 * d).clamp(0, 1)


def _draw(d: torch.Tensor, rng, combos: tuple[str, str]) -> tuple[torch.Tensor, ...]:
    """Each image gets one of the domain's two stroke combos, e.g. ``("light filled", "dark outline")``.

    Returns the stroke mask (filled or outline), the ground colour and the ink colour, per image.
    """
    n = len(d)
    pick = torch.from_numpy(rng.randint(0, 2, size=n))
    light = torch.tensor([combos[int(k)].startswith("light") for k in pick]).view(n, 1, 1, 1)
    outline = torch.tensor([combos[int(k)].endswith("outline") for k in pick]).view(n, 1, 1, 1)
    mask = torch.where(outline, _outline(d), d)
    dark, bright = _random_colors(n, rng, 0.0, 0.3), _random_colors(n, rng, 0.65, 1.0)
    return mask, torch.where(light, dark, bright), torch.where(light, bright, dark)


def _poster(d: torch.Tensor, rng) -> torch.Tensor:
    """Flat colours, filled strokes, either polarity."""
    mask, ground, ink = _draw(d, rng, ("light filled", "dark filled"))
    return ground * (1 - mask) + ink * mask


def _crayon(d: torch.Tensor, rng) -> torch.Tensor:
    """Dark strokes, filled or outline, hatched in two colours, on grainy paper."""
    n, _, h, w = d.shape
    mask, ground, ink = _draw(d, rng, ("dark filled", "dark outline"))
    hatch = _stripes(n, h, w, rng)
    ink = ink * hatch + _random_colors(n, rng, 0.0, 0.3) * (1 - hatch)
    ground = ground * (1 + _uniform(rng, -0.1, 0.1, (n, 1, h, w)))
    return ground * (1 - mask) + ink * mask


def _stencil(d: torch.Tensor, rng) -> torch.Tensor:
    """Outlines of either polarity on a ground with wide soft stripes."""
    n, _, h, w = d.shape
    mask, ground, ink = _draw(d, rng, ("dark outline", "light outline"))
    ground = ground * (0.75 + 0.5 * _stripes(n, h, w, rng, freq=(0.3, 0.8)))
    return ground * (1 - mask) + ink * mask


def _chalk(d: torch.Tensor, rng) -> torch.Tensor:
    """Light strokes, outline or filled, grainy, on a speckled dark board."""
    n, _, h, w = d.shape
    mask, ground, ink = _draw(d, rng, ("light outline", "light filled"))
    mask = mask * (1 + _uniform(rng, -0.4, 0.0, (n, 1, h, w)))
    ground = ground * (1 + _uniform(rng, -0.5, 0.5, (n, 1, h, w)))
    return ground * (1 - mask) + ink * mask


# Version 1 -------------------------------------------------------------------------------------------

def _plain(d: torch.Tensor, rng) -> torch.Tensor:
    """Grey strokes on black."""
    return d.repeat(1, 3, 1, 1)


def _inverted(d: torch.Tensor, rng) -> torch.Tensor:
    """Dark strokes on a flat background of a random colour."""
    return _random_colors(len(d), rng, 0.35, 1.0) * (1 - 0.9 * d)


def _painted(d: torch.Tensor, rng) -> torch.Tensor:
    """Strokes painted with a striped two-colour texture over noisy paper."""
    n, _, h, w = d.shape
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    angle = torch.from_numpy(rng.uniform(0, np.pi, size=(n, 1, 1, 1))).float()
    freq = torch.from_numpy(rng.uniform(0.5, 1.2, size=(n, 1, 1, 1))).float()
    stripes = 0.5 + 0.5 * torch.sin(freq * (xx * torch.cos(angle) + yy * torch.sin(angle)))
    c1, c2 = _random_colors(n, rng, 0.0, 1.0), _random_colors(n, rng, 0.0, 1.0)
    paint = c1 * stripes + c2 * (1 - stripes)
    paper = 0.8 + 0.1 * torch.from_numpy(rng.uniform(-1, 1, size=(n, 1, h, w))).float()
    return paper * (1 - d) + paint * d


def _sketch(d: torch.Tensor, rng) -> torch.Tensor:
    """Pencil edges (Sobel magnitude) on white paper, slightly tinted."""
    edges = _edges(d)
    tint = torch.tensor([0.2, 0.2, 0.35]).view(1, 3, 1, 1)
    return 1 - edges * (1 - tint)
