"""The MultiDomainDataset API: a list of domains, each a torch Dataset of (x, y) with shared classes."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.registry import Registry


class MultiDomainDataset:
    """One DG dataset: ``envs[i]`` holds domain ``domains[i]``; every domain has the same classes.

    Subclasses set the class attributes and fill ``envs`` (and ``classes``) in ``__init__``.
    ``envs[i][k]`` returns a *raw* example (a PIL image or a tensor) and its label; the trainer picks
    the transform (augmented for training splits, plain for evaluation).
    """

    DOMAINS: Sequence[str] = ()  # the fixed domain list, checked against what is on disk
    N_STEPS = 5001
    CHECKPOINT_FREQ = 300
    SMALL_IMAGES = False  # MNIST-sized: DomainBed's small-image hyperparameters and checkpoint rate
    NEEDS = "nothing"  # shown by `dfbench list`: what a user must provide
    CNN_WIDTH = 128  # default width of the small CNN (DomainBed's MNIST network)
    # (mean, std) per channel that model inputs are normalised with; None: model inputs are [0, 1] images
    NORMALIZATION: tuple[Sequence[float], Sequence[float]] | None = None

    input_shape: tuple[int, ...]
    num_classes: int
    classes: list[str]
    domains: list[str]
    envs: list[Dataset]

    def __len__(self) -> int:
        return len(self.envs)

    def __getitem__(self, index: int) -> Dataset:
        return self.envs[index]

    @property
    def name(self) -> str:
        return getattr(type(self), "registered_name", type(self).__name__)

    def train_transform(self, augment: bool) -> Callable | None:
        """Transform for training splits (``None``: examples are model-ready tensors already)."""
        return None

    def eval_transform(self) -> Callable | None:
        return None

    # --- images in [0, 1]: how generative methods move between classifier inputs and diffusion inputs ---
    def item_to_unit(self, x) -> torch.Tensor:
        """One raw example (PIL image, uint8 or float tensor) as a float [C, H, W] image in [0, 1]."""
        if not isinstance(x, torch.Tensor):
            from torchvision.transforms import functional as TF

            x = TF.to_tensor(x.convert("RGB" if int(self.input_shape[0]) == 3 else "L"))
        return x.float().div(255.0) if x.dtype == torch.uint8 else x.float()

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of model inputs (after transforms and normalisation) as images in [0, 1]; differentiable."""
        if self.NORMALIZATION is None:
            return x
        mean, std = (torch.as_tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1) for v in self.NORMALIZATION)
        return x * std + mean

    def from_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] as model inputs (the inverse of ``to_unit``); differentiable."""
        if self.NORMALIZATION is None:
            return x
        mean, std = (torch.as_tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1) for v in self.NORMALIZATION)
        return (x - mean) / std

    def check_test_envs(self, test_envs: Sequence[int]) -> None:
        """One clear error unless ``test_envs`` are distinct domain indices that leave a training domain."""
        n = len(self.domains)
        bad = [t for t in test_envs if not 0 <= t < n]
        if bad or not test_envs or len(set(test_envs)) != len(test_envs) or len(test_envs) >= n:
            listing = ", ".join(f"{i}={d}" for i, d in enumerate(self.domains))
            raise DfbenchError(
                f"--test_envs {list(test_envs)} is not valid for {self.name}: give one or more distinct indices "
                f"from 0..{n - 1}, leaving at least one training domain ({listing})."
            )

    def sizes(self) -> list[int]:
        return [len(env) for env in self.envs]


DATASETS: Registry[type[MultiDomainDataset]] = Registry("dataset")
register_dataset = DATASETS.register
