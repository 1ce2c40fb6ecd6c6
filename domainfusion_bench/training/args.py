"""What a run is asked to do: its arguments (``TrainArgs``, the record's ``args``), how it feeds the
device (``Speed``, outside the run's hash), its resolved hyperparameters and its fingerprint."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from domainfusion_bench.algorithms import algorithm_space
from domainfusion_bench.data import dataset_class, run_identity
from domainfusion_bench.hparams import apply_overrides, parse_hparams_json
from domainfusion_bench.paths import DEFAULT_DATA_DIR
from domainfusion_bench.protocol import HOLDOUT_FRACTION, semantic_args

# Folder datasets up to this many GiB (uint8 at the training resolution) are decoded once into a store.
STORE_MAX_GB = float(os.environ.get("DFBENCH_STORE_GB", "8"))
DEFAULT_OUTPUT_ROOT = "results/train"


@dataclass
class Speed:
    """How a run feeds the device. The defaults are the fast path; ``domainbed()`` is DomainBed's way.

    None of this changes what is trained on (same splits, batches and augmentation distributions), so
    it is not part of ``TrainArgs`` and not part of a run's hash.
    """

    channels_last: bool | None = None  # None: on CUDA
    pin_memory: bool | None = None  # None: on CUDA
    image_store: bool = True  # decode small folder datasets once into a cached uint8 store
    store_max_gb: float = STORE_MAX_GB
    data_on_device: bool = True  # keep tensor datasets on the GPU when they take <= 1/4 of its memory
    per_domain_loaders: bool = False  # one DataLoader with num_workers per training domain
    eval_augment: bool = False  # evaluate training domains with the training transform (DomainBed)

    def on(self, cuda: bool) -> "Speed":
        """These settings with the "on CUDA" defaults decided for this device."""
        return dataclasses.replace(self, channels_last=cuda if self.channels_last is None else self.channels_last,
                                   pin_memory=cuda if self.pin_memory is None else self.pin_memory)

    @classmethod
    def domainbed(cls) -> "Speed":
        return cls(channels_last=False, pin_memory=False, image_store=False, data_on_device=False,
                   per_domain_loaders=True, eval_augment=True)


@dataclass
class TrainArgs:
    """DomainBed's train.py flags, plus dfbench's. ``asdict`` of this is the record's ``args``."""

    dataset: str = "RotatedDigits"
    algorithm: str = "ERM"
    test_envs: list[int] = field(default_factory=lambda: [0])
    data_dir: str = DEFAULT_DATA_DIR
    output_dir: str | None = None  # default: results/train/<run hash>, one dir per configuration
    hparams: str | None = None  # JSON overrides
    hparams_seed: int = 0
    trial_seed: int = 0
    seed: int = 0
    steps: int | None = None  # default: the dataset's N_STEPS
    checkpoint_freq: int | None = None  # default: the dataset's CHECKPOINT_FREQ
    holdout_fraction: float = HOLDOUT_FRACTION
    skip_model_save: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = False
    eval_splits: str = "needed"  # needed | all
    precision: str = "auto"  # auto (bf16 on CUDA) | bf16 | fp32
    num_workers: int | None = None  # one pool for all training domains; default min(8, cores)
    eval_batch_size: int | None = None
    gen_batch_size: int | None = None  # images per denoiser call in generation stages (speed only)
    plugins: list[str] = field(default_factory=list)
    eval_augment: bool = False  # DomainBed: training domains' validation splits use the training transform
    no_image_store: bool = False  # folder datasets through DomainBed's per-image PIL pipeline, never the store


def resolve_hparams(args: TrainArgs) -> dict[str, Any]:
    space = algorithm_space(args.algorithm, dataset_class(args.dataset))
    hparams = space.sample(args.hparams_seed, args.trial_seed)
    where = f"{args.algorithm} on {args.dataset}"
    return apply_overrides(hparams, parse_hparams_json(args.hparams), where)


def run_fingerprint(args: TrainArgs, hparams: dict[str, Any]) -> dict[str, Any]:
    """What defines a run: the arguments that change its result (plugins by content) and the resolved
    hyperparameters. A run dir holds one fingerprint; training into it with another one is refused."""
    return {**semantic_args(run_identity(dataclasses.asdict(args))), "hparams_resolved": hparams}


def default_workers(args: TrainArgs) -> int:
    return args.num_workers if args.num_workers is not None else min(8, os.cpu_count() or 1)
