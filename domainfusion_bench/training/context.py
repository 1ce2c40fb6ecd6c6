"""``TrainingContext``: what an algorithm's hooks may see of the run they are part of."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from domainfusion_bench.costs import CostMeter, MetricMeter
from domainfusion_bench.data import MultiDomainDataset
from domainfusion_bench.data.loaders import SplitDataset
from domainfusion_bench.training.args import TrainArgs


@dataclass
class TrainingContext:
    """What an algorithm's hooks (``prepare``, ``on_step``, ``load_extra_state``) may use: the data it is
    allowed to see, the run's device and precision, the caches, and where to account cost and metrics."""

    dataset: MultiDomainDataset
    train_envs: list[int]
    test_envs: list[int]
    train_splits: list[SplitDataset]  # in-splits of the training domains, training transform applied
    hparams: dict[str, Any]
    args: TrainArgs
    device: torch.device
    costs: CostMeter
    cache_dir: Path
    metrics: MetricMeter = field(default_factory=MetricMeter)
    made_by: str = ""  # who made cached work: this run's directory
    steps_per_epoch: float = 1.0  # of the real training splits
    autocast: Any = contextlib.nullcontext  # ``with context.autocast():`` runs in the run's precision
    heartbeat: Any = lambda: None  # call inside long pre-stages: the run stays visibly alive
    is_main: bool = True
    # a few generated images per stage and domain with what they are (``runfiles.PreviewStrip``); the
    # algorithms add them with ``GenerativeAlgorithm.keep_preview``, the trainer writes them to previews/
    previews: list = field(default_factory=list)

    @property
    def models(self):
        """The cached-model store for helper models (``diffusion/store.py``)."""
        from domainfusion_bench.diffusion.factory import MODELS_SUBDIR
        from domainfusion_bench.diffusion.store import ModelStore

        return ModelStore(self.cache_dir / MODELS_SUBDIR, heartbeat=self.heartbeat)

    @property
    def generations(self):
        """The generation cache (``diffusion/cache.py``)."""
        from domainfusion_bench.diffusion.cache import GenerationCache
        from domainfusion_bench.diffusion.factory import GENERATIONS_SUBDIR

        return GenerationCache(self.cache_dir / GENERATIONS_SUBDIR)
