"""RotatedMNIST and ColoredMNIST from torchvision's MNIST files in the data dir.

Unlike DomainBed, the assignment of images to environments depends only on a fixed dataset seed,
not on the job, so every run of a sweep sees the same environments.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import TensorDataset
from torchvision import datasets as tv_datasets
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from domainfusion_bench.data.base import MultiDomainDataset, register_dataset
from domainfusion_bench.errors import DfbenchError

DATASET_SEED = 0


def load_mnist(data_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All 70,000 MNIST digits (train + test) as uint8 [N, 28, 28] and labels."""
    try:
        parts = [tv_datasets.MNIST(str(data_dir), train=train, download=False) for train in (True, False)]
    except RuntimeError:
        raise DfbenchError(
            f"MNIST not found under {Path(data_dir) / 'MNIST'}. Get it with: dfbench download MNIST --data_dir {data_dir}"
        ) from None
    return torch.cat([p.data for p in parts]), torch.cat([p.targets for p in parts])


class EnvironmentMNIST(MultiDomainDataset):
    """MNIST dealt into ``len(DOMAINS)`` disjoint environments by a fixed shuffle."""

    SMALL_IMAGES = True
    N_STEPS = 5001
    CHECKPOINT_FREQ = 100
    NEEDS = "download: dfbench download MNIST"
    # Recorded in every run's args (training.protocol_settings): where this dataset differs from DomainBed.
    DIFFERENCES: tuple[str, ...] = ("environments from a fixed dataset seed, the same for every job",)

    def __init__(self, data_dir: str | Path):
        images, labels = load_mnist(data_dir)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(DATASET_SEED))
        images, labels = images[order], labels[order]
        k = len(self.DOMAINS)
        self.domains = list(self.DOMAINS)
        self.envs = [self.make_environment(images[i::k], labels[i::k], i) for i in range(k)]

    def make_environment(self, images: torch.Tensor, labels: torch.Tensor, index: int) -> TensorDataset:
        raise NotImplementedError


@register_dataset("RotatedMNIST")
class RotatedMNIST(EnvironmentMNIST):
    DOMAINS = ("0", "15", "30", "45", "60", "75")
    input_shape = (1, 28, 28)
    num_classes = 10
    classes = [str(d) for d in range(10)]

    def make_environment(self, images, labels, index):
        x = images.float().div(255.0).unsqueeze(1)
        x = TF.rotate(x, float(self.DOMAINS[index]), interpolation=InterpolationMode.BILINEAR, fill=0.0)
        return TensorDataset(x, labels.long())


@register_dataset("ColoredMNIST")
class ColoredMNIST(EnvironmentMNIST):
    """Arjovsky et al.: binary label (digit < 5) with 25% noise; colour agrees with it at 90/80/10%.

    14 x 14 pixels (every second row and column), as DomainBed's 2020 code and paper; ``ColoredMNIST28``
    keeps all 28 x 28, as DomainBed's current code does.
    """

    DOMAINS = ("+90%", "+80%", "-90%")
    COLOR_FLIP = (0.1, 0.2, 0.9)
    input_shape = (2, 14, 14)
    num_classes = 2
    classes = ["5-9", "0-4"]  # y = 1 for digits below 5
    STRIDE = 2
    DIFFERENCES = EnvironmentMNIST.DIFFERENCES + ("14 px, as DomainBed 2020 (its current code: 28 px, ColoredMNIST28)",)

    def make_environment(self, images, labels, index):
        g = torch.Generator().manual_seed(DATASET_SEED * 1000 + index)
        images = images[:, ::self.STRIDE, ::self.STRIDE]
        y = (labels < 5).long() ^ (torch.rand(len(labels), generator=g) < 0.25).long()
        colors = y ^ (torch.rand(len(labels), generator=g) < self.COLOR_FLIP[index]).long()
        x = torch.stack([images, images], dim=1).float().div(255.0)
        x[torch.arange(len(x)), 1 - colors] = 0.0
        return TensorDataset(x, y)


@register_dataset("ColoredMNIST28")
class ColoredMNIST28(ColoredMNIST):
    """ColoredMNIST at full 28 x 28 resolution (DomainBed's current code); same labels, colours and splits."""

    input_shape = (2, 28, 28)
    STRIDE = 1
    DIFFERENCES = EnvironmentMNIST.DIFFERENCES + ("28 px, as DomainBed's current code (2020: 14 px, ColoredMNIST)",)
