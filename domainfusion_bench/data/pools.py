"""Training splits that mix real and synthetic images (CDGA, DomainFusion, TGDP, oracle guidance).

Synthetic images are kept as uint8 ([N, C, H, W], the generation cache's format), never as float copies
of a dataset. A mixed split lists every real item ``a`` times and every synthetic item ``b`` times, so
the trainer's uniform draws take each real image equally often, each synthetic image equally often,
and a synthetic one with probability ``b n_syn / (a n_real + b n_syn)``, the closest to the asked
fraction with ``a`` at most ``MAX_COPIES``.
"""

from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from domainfusion_bench.data.loaders import SplitDataset

MAX_COPIES = 64  # bound on a: the index layout stays small (it indexes the data, it does not copy it)


def copies(n_real: int, n_synthetic: int, fraction: float) -> tuple[int, int]:
    """(a, b): how many slots each real and each synthetic item gets for a synthetic share near ``fraction``."""
    if n_synthetic == 0 or fraction <= 0:
        return 1, 0
    if n_real == 0 or fraction >= 1:
        return 0, 1
    # b n_syn / (a n_real) = fraction / (1 - fraction)  ->  b / a = ratio
    ratio = Fraction(fraction / (1 - fraction) * n_real / n_synthetic).limit_denominator(MAX_COPIES)
    return ratio.denominator, max(ratio.numerator, 1)


def synthetic_share(split: Dataset) -> float:
    """The share of a mixed split's draws that are synthetic (0 for a plain split)."""
    return getattr(split, "synthetic_share", 0.0)


def _fit(images: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """uint8 synthetic images at the real tensors' size and dtype (uint8 stays uint8; float -> [0, 1])."""
    size = tuple(like.shape[-2:])
    out = []
    for chunk in images.split(256):
        x = chunk.float() / 255.0
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        if x.shape[1] != like.shape[1]:  # e.g. a 3-channel generator for a 1-channel dataset
            x = x.mean(1, keepdim=True).expand(-1, like.shape[1], -1, -1)
        out.append((x * 255).round().to(torch.uint8) if like.dtype == torch.uint8 else x.to(like.dtype))
    return torch.cat(out) if out else like[:0]


class MixedDataset(Dataset):
    """Per-item path (folder datasets read as PIL images): real items through the split, synthetic uint8
    images through the split's transform as PIL images, laid out by ``slots`` of (0 real | 1 synthetic, i)."""

    def __init__(self, real: Dataset, images: torch.Tensor, labels: torch.Tensor, slots, transform=None):
        self.real, self.images, self.labels, self.slots, self.transform = real, images, labels, slots, transform

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, k: int):
        source, i = self.slots[k]
        if source == 0:
            return self.real[i]
        x = self.images[i]
        if self.transform is not None:
            from torchvision.transforms import functional as TF

            return self.transform(TF.to_pil_image(x)), int(self.labels[i])
        return x.float() / 255.0, int(self.labels[i])


def mixed_split(real: Dataset, images: torch.Tensor, labels: torch.Tensor, fraction: float) -> Dataset:
    """A training split over ``real`` (a SplitDataset) and uint8 synthetic ``images`` with their labels.

    Keeps the trainer's tensor fast path when the real split has one (embedded data, the uint8 store).
    """
    if images.dtype != torch.uint8:
        raise TypeError("synthetic images must be uint8 [N, C, H, W] (quantise with diffusion.cache.quantize)")
    labels = torch.as_tensor(labels, dtype=torch.long)
    a, b = copies(len(real), len(images), fraction)
    view = real.tensor_view() if isinstance(real, SplitDataset) else None
    if view is not None:
        x, y, rows = view
        sx = _fit(images, x)
        data = TensorDataset(torch.cat([x[rows], sx.to(x.device)]), torch.cat([y[rows], labels.to(y.dtype).to(y.device)]))
        n = len(rows)
        indices = [i for i in range(n) for _ in range(a)] + [n + i for i in range(len(sx)) for _ in range(b)]
        split = SplitDataset(data, indices, real.transform, real.batch_transform)
    else:
        slots = [(0, i) for i in range(len(real)) for _ in range(a)] + [(1, i) for i in range(len(images)) for _ in range(b)]
        split = MixedDataset(real, images, labels, slots, getattr(real, "transform", None))
    total = a * len(real) + b * len(images)
    split.synthetic_share = b * len(images) / total if total else 0.0
    return split
