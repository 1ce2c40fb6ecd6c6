"""Hyperparameter spaces: a default and a random distribution per name (DESIGN.md section 3).

``hparams_seed == 0`` gives the defaults; otherwise each name is drawn from its own stream seeded by
``seed_hash(seed_hash(hparams_seed, trial_seed), name)``, exactly as DomainBed draws them.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

import numpy as np

from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.protocol import hparam_rng, hparams_random_seed

Sampler = Callable[[np.random.RandomState], Any]


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars, so hparams serialise to JSON unchanged."""
    return value.item() if isinstance(value, np.generic) else value


class HParamSpace:
    """Ordered name -> (default, sampler). Algorithms extend it in ``Algorithm.hparam_space``."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Any, Sampler]] = {}

    def add(self, name: str, default: Any, sample: Sampler | None = None) -> None:
        """Declare ``name``; without ``sample`` the value is fixed at ``default`` in random draws too."""
        self._entries[name] = (default, sample or (lambda r, d=default: d))

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return list(self._entries)

    def defaults(self) -> dict[str, Any]:
        return {name: default for name, (default, _) in self._entries.items()}

    def draw(self, random_seed: int) -> dict[str, Any]:
        return {name: _plain(sample(hparam_rng(random_seed, name))) for name, (_, sample) in self._entries.items()}

    def sample(self, hparams_seed: int, trial_seed: int) -> dict[str, Any]:
        if hparams_seed == 0:
            return self.defaults()
        return self.draw(hparams_random_seed(hparams_seed, trial_seed))


def base_space(dataset: type) -> HParamSpace:
    """What every algorithm shares: DomainBed's values for lr, batch_size, weight_decay, dropout.

    ``dataset`` is a MultiDomainDataset class: its name, SMALL_IMAGES and CNN_WIDTH matter here.
    """
    dataset_name = getattr(dataset, "registered_name", dataset.__name__)
    small_images = dataset.SMALL_IMAGES
    space = HParamSpace()
    space.add("data_augmentation", True)
    space.add("backbone", "auto")  # auto: small CNN for MNIST-sized inputs, else ResNet-50
    space.add("pretrained", "imagenet")  # imagenet | none | path to a state_dict file
    space.add("freeze_bn", True)
    space.add("resnet_dropout", 0.0, lambda r: r.choice([0.0, 0.1, 0.5]))
    space.add("nonlinear_classifier", False)
    space.add("cnn_width", dataset.CNN_WIDTH)  # channels of the small CNN (MNIST-sized inputs)
    if small_images:
        space.add("lr", 1e-3, lambda r: 10 ** r.uniform(-4.5, -2.5))
        space.add("weight_decay", 0.0)
        space.add("batch_size", 64, lambda r: int(2 ** r.uniform(3, 9)))
    else:
        space.add("lr", 5e-5, lambda r: 10 ** r.uniform(-5, -3.5))
        space.add("weight_decay", 0.0, lambda r: 10 ** r.uniform(-6, -2))
        high = 5 if dataset_name == "DomainNet" else 5.5
        space.add("batch_size", 32, lambda r: int(2 ** r.uniform(3, high)))
    return space


def parse_hparams_json(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DfbenchError(
            f"--hparams is not valid JSON ({err.msg} at column {err.colno}): {text!r}. "
            'Example: --hparams \'{"lr": 1e-4, "batch_size": 16}\''
        ) from None
    if not isinstance(value, dict):
        raise DfbenchError(f"--hparams must be a JSON object of name: value, got {type(value).__name__}: {text!r}")
    return value


def apply_overrides(hparams: dict[str, Any], overrides: Mapping[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(overrides) - set(hparams))
    if unknown:
        raise DfbenchError(
            f"unknown hyperparameter(s) {', '.join(unknown)} for {where}. Known: {', '.join(sorted(hparams))}."
        )
    for name, value in overrides.items():
        default = hparams[name]
        if isinstance(default, (int, float)) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise DfbenchError(f"hyperparameter {name} for {where} must be a number like its default {default!r}, "
                               f"got {value!r}")
    return {**hparams, **overrides}
