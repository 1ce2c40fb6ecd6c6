"""Sweep specs: a mapping (a parsed YAML file plus CLI overrides) -> a validated ``SweepSpec``.

Every problem is a ``DfbenchError`` that names the spec and the key. Algorithms, datasets and the trainer
import torch, so they are imported inside the functions that consult them: importing a spec costs no torch.
A spec's ``plugins`` are code: parsing never runs them (``sweep status``, ``dry_run``); ``with_plugins`` does,
when the sweep is launched or the user says ``--trust-plugins``, and then checks what they register.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.hparams import RENAMED, check_train_args, check_value
from domainfusion_bench.paths import DEFAULT_DATA_DIR
from domainfusion_bench.protocol import HOLDOUT_FRACTION
from domainfusion_bench.sweep.spec_file import read_spec_file

TEST_ENV_MODES = ("singles", "singles+pairs")
# TrainArgs fields a spec may set through ``train_args``; the others are the sweep's to set.
SWEEP_SET_ARGS = frozenset({
    "dataset", "algorithm", "test_envs", "hparams", "hparams_seed", "trial_seed", "seed", "steps",
    "checkpoint_freq", "holdout_fraction", "output_dir", "data_dir", "plugins",
})


def train_arg_names() -> list[str]:
    """TrainArgs' fields in their order (the order of ``dfbench train`` flags)."""
    from domainfusion_bench.training import TrainArgs

    return [f.name for f in dataclasses.fields(TrainArgs)]


@dataclass
class SweepSpec:
    """A validated sweep. ``algorithms`` is resolved (``all`` -> every registered name)."""

    name: str
    datasets: list[str]
    algorithms: list[str]
    output_dir: str = ""  # default: results/<name>
    data_dir: str = DEFAULT_DATA_DIR
    n_hparams: int = 20  # hparams seeds n_hparams_from .. n_hparams-1, as DomainBed's sweep
    n_hparams_from: int = 0
    n_trials: int = 3
    test_envs: str | list[list[int]] = "singles"  # singles | singles+pairs | explicit [[0], [1, 2]]
    steps: int | None = None  # None: each dataset's default
    checkpoint_freq: int | None = None
    hparams: dict[str, Any] = field(default_factory=dict)  # fixed overrides
    grid: dict[str, list[Any]] = field(default_factory=dict)  # ablation: crossed with the random draws
    holdout_fraction: float = HOLDOUT_FRACTION
    plugins: list[str] = field(default_factory=list)
    train_args: dict[str, Any] = field(default_factory=dict)  # other TrainArgs fields (device, ...)
    launcher: str = "local"
    launcher_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # {launcher: {option: value}}
    source: str = field(default="<spec>", compare=False)  # where the spec came from, for messages
    every_algorithm: bool = field(default=False, compare=False)  # ``all``: plugins' algorithms too, once loaded

    def test_env_sets(self, dataset: str) -> list[list[int]]:
        """DomainBed's order: [0], [0, 1], [0, 2], ..., [1], [1, 2], ... in pairs mode."""
        if not isinstance(self.test_envs, str):
            return [list(t) for t in self.test_envs]
        n = n_domains(dataset, self.data_dir)
        if self.test_envs == "singles":
            return [[i] for i in range(n)]
        return [t for i in range(n) for t in ([i], *([i, j] for j in range(i + 1, n)))]


SPEC_KEYS = [f.name for f in dataclasses.fields(SweepSpec) if f.name not in ("source", "every_algorithm")]


def load_spec(path: str | Path, overrides: Mapping[str, Any] | None = None) -> SweepSpec:
    """Read and validate a YAML spec; ``overrides`` (CLI flags, ``None`` = not given) win over its fields.
    ``hparams`` is merged key by key: ``--hparams '{"lr": 1e-4}'`` changes lr and keeps the spec's others."""
    raw = read_spec_file(path)
    raw.setdefault("name", Path(path).stem)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "hparams" and isinstance(value, dict) and isinstance(raw.get("hparams"), dict):
            value = {**raw["hparams"], **value}
        raw[key] = value
    return parse_spec(raw, source=str(path))


def parse_spec(raw: Mapping[str, Any], source: str = "<spec>") -> SweepSpec:
    """Validate a spec given as a mapping; every problem is a DfbenchError that names the key."""
    from domainfusion_bench.algorithms import ALGORITHMS
    from domainfusion_bench.data import dataset_class

    def fail(message: str) -> DfbenchError:
        return DfbenchError(f"{source}: {message}")

    unknown = [k for k in raw if k not in SPEC_KEYS]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), SPEC_KEYS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise fail(f"unknown key {key!r}.{hint} Keys: {', '.join(SPEC_KEYS)}.")
    for key in ("datasets", "algorithms"):
        if key not in raw:
            raise fail(f"{key!r} is required")

    def integer(key: str, minimum: int, default: Any) -> Any:
        value = raw.get(key, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise fail(f"{key} must be an integer >= {minimum}, got {value!r}")
        return value

    def str_list(key: str, default: Any) -> list[str]:
        value = raw.get(key, default)
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise fail(f"{key} must be a name or a list of names, got {value!r}")
        return list(dict.fromkeys(value))  # drop repeats, keep order

    def mapping(key: str) -> dict[str, Any]:
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            raise fail(f"{key} must be a mapping of name: value, got {value!r}")
        return dict(value)

    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise fail(f"name must be a non-empty string, got {name!r}")
    output_dir = raw.get("output_dir") or str(Path("results") / name)
    data_dir = raw.get("data_dir") or DEFAULT_DATA_DIR
    if not isinstance(output_dir, str) or not isinstance(data_dir, str):
        raise fail("output_dir and data_dir must be paths (strings)")

    plugins = [str(Path(p).resolve()) for p in str_list("plugins", [])]  # not run here: see with_plugins

    datasets = str_list("datasets", None)
    if not datasets:
        raise fail("datasets is empty")
    for dataset in datasets:
        try:
            dataset_class(dataset)
        except DfbenchError as err:
            raise fail(f"datasets: {err}") from None

    algorithms = raw["algorithms"]
    every = algorithms == "all"
    if every:
        algorithms = ALGORITHMS.names()
    else:
        algorithms = str_list("algorithms", None)
        if not algorithms:
            raise fail("algorithms is empty (give names, or `all` for every registered algorithm)")
        for algorithm in algorithms:
            try:
                ALGORITHMS.get(algorithm)
            except DfbenchError as err:
                if not plugins:  # else a plugin may register it: checked when the plugins run
                    raise fail(f"algorithms: {err}") from None

    n_hparams_from = integer("n_hparams_from", 0, 0)
    n_hparams = integer("n_hparams", 1, 20)
    if n_hparams <= n_hparams_from:
        raise fail(
            f"n_hparams ({n_hparams}) must be above n_hparams_from ({n_hparams_from}): as in DomainBed, the sweep "
            f"runs hparams seeds n_hparams_from .. n_hparams-1 (seed 0 = the default hyperparameters)"
        )

    holdout = raw.get("holdout_fraction", HOLDOUT_FRACTION)
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 < holdout < 1:
        raise fail(f"holdout_fraction must be a number between 0 and 1, got {holdout!r}")

    spec = SweepSpec(
        name=name,
        datasets=datasets,
        algorithms=algorithms,
        output_dir=output_dir,
        data_dir=data_dir,
        n_hparams=n_hparams,
        n_hparams_from=n_hparams_from,
        n_trials=integer("n_trials", 1, 3),
        test_envs=_check_test_envs(raw.get("test_envs", "singles"), datasets, data_dir, fail),
        steps=integer("steps", 1, None),
        checkpoint_freq=integer("checkpoint_freq", 1, None),
        hparams=mapping("hparams"),
        grid=mapping("grid"),
        holdout_fraction=float(holdout),
        plugins=plugins,
        train_args=mapping("train_args"),
        launcher=raw.get("launcher") or "local",
        launcher_options=mapping("launcher_options"),
        source=source,
        every_algorithm=every,
    )
    _check_hparams(spec, fail)
    _check_train_args(spec.train_args, fail)
    for launcher, options in spec.launcher_options.items():
        if not isinstance(options, dict):
            raise fail(f"launcher_options.{launcher} must be a mapping of option: value, got {options!r}")
    return spec


def with_plugins(spec: SweepSpec) -> SweepSpec:
    """Run the spec's plugins (only to launch the sweep, or when the user trusts them) and check the
    algorithm names and hyperparameters against what they registered."""
    from domainfusion_bench.algorithms import ALGORITHMS, load_plugins

    def fail(message: str) -> DfbenchError:
        return DfbenchError(f"{spec.source}: {message}")

    if not spec.plugins:
        return spec
    try:
        load_plugins(spec.plugins)
    except DfbenchError as err:
        raise fail(str(err)) from None
    for algorithm in spec.algorithms:
        try:
            ALGORITHMS.get(algorithm)
        except DfbenchError as err:
            raise fail(f"algorithms: {err} (after loading the plugins {', '.join(spec.plugins)})") from None
    spec = dataclasses.replace(spec, algorithms=ALGORITHMS.names() if spec.every_algorithm else spec.algorithms)
    _check_hparams(spec, fail)
    return spec


def check_registered(spec: SweepSpec) -> None:
    """Jobs need every algorithm's hyperparameter space: fail clearly when a plugin's is not loaded."""
    from domainfusion_bench.algorithms import ALGORITHMS

    missing = [a for a in spec.algorithms if a not in ALGORITHMS.names()]
    if missing:
        raise DfbenchError(
            f"{spec.source}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not built in but would come "
            f"from the spec's plugins ({', '.join(spec.plugins)}), which are code: dfbench runs them only to launch "
            "the sweep. To list its jobs or show its status anyway, pass --trust-plugins.")


def n_domains(dataset: str, data_dir: str) -> int:
    """Number of domains without loading images (folder datasets: their subfolders)."""
    from domainfusion_bench.data import FOLDER_PREFIX, dataset_class, get_dataset

    if dataset.startswith(FOLDER_PREFIX):
        root = Path(dataset[len(FOLDER_PREFIX):])
        if not root.is_dir():
            raise DfbenchError(f"{root} is not a directory (folder datasets need <path>/<domain>/<class>/<image>).")
        return sum(1 for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    cls = dataset_class(dataset)
    return len(cls.DOMAINS) if cls.DOMAINS else len(get_dataset(dataset, data_dir).domains)


def _domain_listing(dataset: str) -> str:
    from domainfusion_bench.data import dataset_class

    domains = getattr(dataset_class(dataset), "DOMAINS", ())
    return ", ".join(f"{i}={d}" for i, d in enumerate(domains)) if domains else ""


def _check_test_envs(value: Any, datasets: list[str], data_dir: str, fail) -> str | list[list[int]]:
    if isinstance(value, str):
        if value not in TEST_ENV_MODES:
            close = difflib.get_close_matches(value, TEST_ENV_MODES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise fail(f"test_envs {value!r} is not a mode.{hint} Give singles, singles+pairs, or a list such as [[0], [1, 2]].")
        if value == "singles+pairs":
            for dataset in datasets:
                if n_domains(dataset, data_dir) < 3:
                    raise fail(f"test_envs singles+pairs needs at least 3 domains; {dataset} has fewer")
        return value
    if not isinstance(value, list) or not value:
        raise fail(f"test_envs must be singles, singles+pairs or a non-empty list like [[0], [1, 2]], got {value!r}")
    sets = []
    for entry in value:
        entry = [entry] if isinstance(entry, int) and not isinstance(entry, bool) else entry
        if not isinstance(entry, list) or not entry or not all(isinstance(i, int) and not isinstance(i, bool) for i in entry):
            raise fail(f"test_envs entry {entry!r} must be a domain index or a list of domain indices")
        if len(set(entry)) != len(entry):
            raise fail(f"test_envs entry {entry} repeats a domain")
        sets.append(sorted(entry))
    for dataset in datasets:
        n = n_domains(dataset, data_dir)
        for entry in sets:
            bad = [i for i in entry if not 0 <= i < n]
            if bad:
                listing = _domain_listing(dataset)
                raise fail(
                    f"test_envs: domain index {bad[0]} is out of range for {dataset}, which has {n} domains "
                    f"(0..{n - 1}{': ' + listing if listing else ''})"
                )
            if len(entry) >= n:
                raise fail(f"test_envs {entry} leaves no training domain in {dataset} ({n} domains)")
    return sets


def hparam_names(spec: SweepSpec) -> dict[tuple[str, str], list[str]]:
    """The hyperparameter names of each (dataset, algorithm) of the sweep."""
    from domainfusion_bench.algorithms import algorithm_space
    from domainfusion_bench.data import dataset_class

    return {
        (d, a): algorithm_space(a, dataset_class(d)).names() for d in spec.datasets for a in spec.algorithms
    }


def _check_hparams(spec: SweepSpec, fail) -> None:
    from domainfusion_bench.algorithms import ALGORITHMS, algorithm_space
    from domainfusion_bench.data import dataset_class

    # a name is checked against every registered algorithm, not only this sweep's: a spec written for many
    # algorithms (sweeps/demo.yaml) still runs with `--algorithms ERM`, each run taking the names it has;
    # a name no algorithm has is a typo
    known = sorted({name for d in spec.datasets for a in ALGORITHMS.names()
                    for name in algorithm_space(a, dataset_class(d)).names()})
    registered = [a for a in spec.algorithms if a in ALGORITHMS.names()]  # the others: plugins not loaded yet
    for key, values in (("hparams", spec.hparams), ("grid", spec.grid)):
        for name in values:
            if name not in known and len(registered) == len(spec.algorithms):
                close = [RENAMED[name]] if name in RENAMED else difflib.get_close_matches(name, known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise fail(
                    f"{key}: unknown hyperparameter {name!r} (no registered algorithm has it).{hint} "
                    f"Known: {', '.join(known)}."
                )
    for name, values in spec.grid.items():
        if not isinstance(values, list) or not values:
            raise fail(f"grid.{name} must be a non-empty list of values, got {values!r}")
        if name in spec.hparams:
            raise fail(f"{name} is both a fixed hparam and a grid axis; keep one")
    for (dataset, algorithm), names in hparam_names(dataclasses.replace(spec, algorithms=registered)).items():
        # types and ranges, as train checks them
        defaults = algorithm_space(algorithm, dataset_class(dataset)).defaults()
        where = f"{algorithm} on {dataset}"
        try:
            for name, value in spec.hparams.items():
                if name in defaults:
                    check_value(name, defaults[name], value, where)
            for name, values in spec.grid.items():
                for value in values if name in defaults else []:
                    check_value(name, defaults[name], value, where)
        except DfbenchError as err:
            raise fail(f"hparams: {err}") from None


def _check_train_args(train_args: Mapping[str, Any], fail) -> None:
    from domainfusion_bench.training import TrainArgs

    fields = train_arg_names()
    allowed = sorted(set(fields) - SWEEP_SET_ARGS)
    for name in train_args:
        if name in SWEEP_SET_ARGS:
            raise fail(f"train_args.{name} is set by the sweep itself; use the spec key {name!r} instead")
        if name not in fields:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise fail(f"train_args: unknown training argument {name!r}.{hint} Allowed: {', '.join(allowed)}.")
    try:
        check_train_args(TrainArgs(**train_args))
    except DfbenchError as err:
        raise fail(f"train_args: {err}") from None
