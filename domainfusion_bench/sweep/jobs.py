"""Jobs: a ``SweepSpec`` -> one ``TrainArgs`` per run, each with its hashed run dir, and its command.

The trainer and the datasets import torch: they are imported inside the functions that build jobs."""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.protocol import run_hash, seed_hash
from domainfusion_bench.sweep.spec import SweepSpec, check_registered, hparam_names, n_domains, train_arg_names

if TYPE_CHECKING:
    from domainfusion_bench.training import TrainArgs


@dataclass
class Job:
    """One training run of a sweep. ``args.output_dir`` is its run dir."""

    args: TrainArgs
    grid_point: dict[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return Path(self.args.output_dir)

    def train_argv(self) -> list[str]:
        return train_argv(self.args)

    def command(self, prefix: Sequence[str] | None = None) -> list[str]:
        """The argument list that runs this job; the default prefix is ``python -m domainfusion_bench``."""
        return [*(prefix if prefix is not None else module_prefix()), *self.train_argv()]

    def describe(self) -> str:
        a = self.args
        grid = "".join(f" {k}={v}" for k, v in self.grid_point.items())
        return (f"{a.algorithm} {a.dataset} test_envs={a.test_envs} hparams_seed={a.hparams_seed} "
                f"trial_seed={a.trial_seed}{grid}")


def module_prefix() -> list[str]:
    return [sys.executable, "-m", "domainfusion_bench"]


def train_argv(args: TrainArgs) -> list[str]:
    """``dfbench train`` flags for ``args``; parsing them back gives ``args`` again (tested)."""
    argv = ["train"]
    for name in train_arg_names():
        value = getattr(args, name)
        if value is None or value is False:  # None: the flag's default; False: a store_true flag left off
            continue
        if value is True:
            argv.append(f"--{name}")
        elif isinstance(value, (list, tuple)):
            if value:
                argv += [f"--{name}", *map(str, value)]
        else:
            argv += [f"--{name}", str(value)]
    return argv


def make_jobs(spec: SweepSpec) -> list[Job]:
    """trial_seed x dataset x algorithm x test_envs x hparams_seed (x grid point), DomainBed's order."""
    from domainfusion_bench.data import run_identity
    from domainfusion_bench.training import TrainArgs

    check_registered(spec)
    spaces = hparam_names(spec)
    data_dir = str(Path(spec.data_dir).resolve())
    output_dir = Path(spec.output_dir).resolve()
    jobs = []
    for trial_seed, dataset, algorithm in itertools.product(range(spec.n_trials), spec.datasets, spec.algorithms):
        known = spaces[dataset, algorithm]
        fixed = {k: v for k, v in spec.hparams.items() if k in known}
        axes = {k: v for k, v in spec.grid.items() if k in known}
        points = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
        for test_envs in spec.test_env_sets(dataset):
            for hparams_seed in range(spec.n_hparams_from, spec.n_hparams):
                for point in points:
                    overrides = {**fixed, **point}
                    args = TrainArgs(
                        dataset=dataset,
                        algorithm=algorithm,
                        test_envs=list(test_envs),
                        data_dir=data_dir,
                        hparams=json.dumps(overrides, sort_keys=True) if overrides else None,
                        hparams_seed=hparams_seed,
                        trial_seed=trial_seed,
                        seed=seed_hash(dataset, algorithm, list(test_envs), hparams_seed, trial_seed),
                        steps=spec.steps,
                        checkpoint_freq=spec.checkpoint_freq,
                        holdout_fraction=spec.holdout_fraction,
                        plugins=list(spec.plugins),
                        **spec.train_args,
                    )
                    args.output_dir = str(output_dir / run_hash(run_identity(dataclasses.asdict(args))))
                    jobs.append(Job(args, point))
    return jobs


def check_data(spec: SweepSpec) -> None:
    """Fail before launching anything when a dataset is not on disk (with the download command)."""
    from domainfusion_bench.data import FOLDER_PREFIX, dataset_class, get_dataset
    from domainfusion_bench.data.folder import ImageFolderDataset

    for dataset in spec.datasets:
        cls = dataset_class(dataset)
        if not issubclass(cls, ImageFolderDataset):
            get_dataset(dataset, spec.data_dir)  # small datasets: loading them is the check
        elif dataset.startswith(FOLDER_PREFIX):
            n_domains(dataset, spec.data_dir)
        elif not (Path(spec.data_dir) / cls.SUBDIR).is_dir():  # no scan of big image folders here
            raise DfbenchError(
                f"{dataset} not found at {Path(spec.data_dir) / cls.SUBDIR}. Get it with: dfbench download {dataset} "
                f"--data_dir {spec.data_dir} (or point the sweep at your copy with --data_dir)."
            )
