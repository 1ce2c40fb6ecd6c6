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


@register_dataset("DigitStyles")
class DigitStyles(EmbeddedDigits):
    """Four RGB domains that differ in appearance, not geometry; each digit image is used once."""

    DOMAINS = ("plain", "inverted", "painted", "sketch")
    input_shape = (3, 32, 32)

    def build(self):
        x, y = _digits(box=24, size=32)
        rng = np.random.RandomState(DATASET_SEED)
        k = len(self.DOMAINS)
        styles = (_plain, _inverted, _painted, _sketch)
        return [TensorDataset(style(x[i::k], rng).clamp(0, 1), y[i::k]) for i, style in enumerate(styles)]


def _random_colors(n: int, rng: np.random.RandomState, low: float, high: float) -> torch.Tensor:
    return torch.from_numpy(rng.uniform(low, high, size=(n, 3, 1, 1))).float()


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
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    gx, gy = F.conv2d(d, kx, padding=1), F.conv2d(d, kx.transpose(2, 3), padding=1)
    edges = (gx.pow(2) + gy.pow(2)).sqrt().clamp(0, 2) / 2
    tint = torch.tensor([0.2, 0.2, 0.35]).view(1, 3, 1, 1)
    return 1 - edges * (1 - tint)
