"""Sweeps: a YAML spec -> a validated ``SweepSpec`` -> jobs (hashed run dirs) -> run states.

A job is one ``training.TrainArgs``; its run dir is ``<output_dir>/<protocol.run_hash(args)>``, so the
same arguments always land in the same dir and moving the data (or the results) never re-keys a sweep.
A run's state is read from its dir alone (``runfiles``): ``done`` file -> done; a lock held by a live
process (or, from another host, a recent heartbeat) -> running; a ``failed`` file or a lock whose
process is gone -> failed; nothing -> not launched. Launching is in ``launchers``.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from domainfusion_bench import runfiles
from domainfusion_bench.algorithms import ALGORITHMS, algorithm_space, load_plugins
from domainfusion_bench.data import FOLDER_PREFIX, dataset_class, get_dataset, run_identity
from domainfusion_bench.data.folder import ImageFolderDataset
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.hparams import check_train_args, check_value
from domainfusion_bench.protocol import HOLDOUT_FRACTION, run_hash, seed_hash
from domainfusion_bench.paths import DEFAULT_DATA_DIR
from domainfusion_bench.training import TrainArgs, resolve_hparams, run_fingerprint

TEST_ENV_MODES = ("singles", "singles+pairs")
# TrainArgs fields a spec may set through ``train_args``; the others are the sweep's to set.
SWEEP_SET_ARGS = frozenset({
    "dataset", "algorithm", "test_envs", "hparams", "hparams_seed", "trial_seed", "seed", "steps",
    "checkpoint_freq", "holdout_fraction", "output_dir", "data_dir", "plugins",
})
TRAIN_ARG_FIELDS = {f.name: f for f in dataclasses.fields(TrainArgs)}


# ----------------------------------------------------------------------------------------- specs


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

    def test_env_sets(self, dataset: str) -> list[list[int]]:
        """DomainBed's order: [0], [0, 1], [0, 2], ..., [1], [1, 2], ... in pairs mode."""
        if not isinstance(self.test_envs, str):
            return [list(t) for t in self.test_envs]
        n = n_domains(dataset, self.data_dir)
        if self.test_envs == "singles":
            return [[i] for i in range(n)]
        return [t for i in range(n) for t in ([i], *([i, j] for j in range(i + 1, n)))]


SPEC_KEYS = [f.name for f in dataclasses.fields(SweepSpec) if f.name != "source"]


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice (YAML would silently keep the last one) and reads
    ``1e-4`` as a number, as JSON and YAML 1.2 do (PyYAML's YAML 1.1 wants a dot: ``1.0e-4``)."""


_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """YAML (or JSON) the way specs are read: duplicate keys refused, ``1e-4`` a float."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice (first on line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_spec_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise DfbenchError(f"cannot read sweep spec {path}: {err.strerror}. Specs live in sweeps/*.yaml.") from None
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise DfbenchError(f"{path}{where}: bad YAML: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise DfbenchError(f"{path}: a sweep spec is a mapping of key: value, got {type(raw).__name__}")
    return raw


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

    plugins = [str(Path(p).resolve()) for p in str_list("plugins", [])]
    try:
        load_plugins(plugins)  # before algorithm names are checked: plugins register algorithms
    except DfbenchError as err:
        raise fail(str(err)) from None

    datasets = str_list("datasets", None)
    if not datasets:
        raise fail("datasets is empty")
    for dataset in datasets:
        try:
            dataset_class(dataset)
        except DfbenchError as err:
            raise fail(f"datasets: {err}") from None

    algorithms = raw["algorithms"]
    if algorithms == "all":
        algorithms = ALGORITHMS.names()
    else:
        algorithms = str_list("algorithms", None)
        if not algorithms:
            raise fail("algorithms is empty (give names, or `all` for every registered algorithm)")
        for algorithm in algorithms:
            try:
                ALGORITHMS.get(algorithm)
            except DfbenchError as err:
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
    )
    _check_hparams(spec, fail)
    _check_train_args(spec.train_args, fail)
    for launcher, options in spec.launcher_options.items():
        if not isinstance(options, dict):
            raise fail(f"launcher_options.{launcher} must be a mapping of option: value, got {options!r}")
    return spec


def n_domains(dataset: str, data_dir: str) -> int:
    """Number of domains without loading images (folder datasets: their subfolders)."""
    if dataset.startswith(FOLDER_PREFIX):
        root = Path(dataset[len(FOLDER_PREFIX):])
        if not root.is_dir():
            raise DfbenchError(f"{root} is not a directory (folder datasets need <path>/<domain>/<class>/<image>).")
        return sum(1 for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    cls = dataset_class(dataset)
    return len(cls.DOMAINS) if cls.DOMAINS else len(get_dataset(dataset, data_dir).domains)


def _domain_listing(dataset: str) -> str:
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


def _spaces(spec: SweepSpec) -> dict[tuple[str, str], list[str]]:
    return {
        (d, a): algorithm_space(a, dataset_class(d)).names() for d in spec.datasets for a in spec.algorithms
    }


def _check_hparams(spec: SweepSpec, fail) -> None:
    # a name is checked against every registered algorithm, not only this sweep's: a spec written for many
    # algorithms (sweeps/demo.yaml) still runs with `--algorithms ERM`, each run taking the names it has;
    # a name no algorithm has is a typo
    known = sorted({name for d in spec.datasets for a in ALGORITHMS.names()
                    for name in algorithm_space(a, dataset_class(d)).names()})
    for key, values in (("hparams", spec.hparams), ("grid", spec.grid)):
        for name in values:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
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
    for (dataset, algorithm), names in _spaces(spec).items():  # types and ranges, as train checks them
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
    allowed = sorted(set(TRAIN_ARG_FIELDS) - SWEEP_SET_ARGS)
    for name in train_args:
        if name in SWEEP_SET_ARGS:
            raise fail(f"train_args.{name} is set by the sweep itself; use the spec key {name!r} instead")
        if name not in TRAIN_ARG_FIELDS:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise fail(f"train_args: unknown training argument {name!r}.{hint} Allowed: {', '.join(allowed)}.")
    try:
        check_train_args(TrainArgs(**train_args))
    except DfbenchError as err:
        raise fail(f"train_args: {err}") from None


# ------------------------------------------------------------------------------------------ jobs


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
    for name in TRAIN_ARG_FIELDS:
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
    spaces = _spaces(spec)
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


# ---------------------------------------------------------------------------------------- states


class State(str, Enum):
    NOT_LAUNCHED = "not launched"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass
class RunState:
    state: State
    reason: str = ""  # failed: the last error line; running: who holds the lock


def last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def failure_reason(run_dir: Path) -> str:
    info = runfiles.read_json(run_dir / runfiles.FAILED)
    if info and info.get("error"):
        return str(info["error"]).strip().splitlines()[-1]
    return last_line(run_dir / "err.txt") or last_line(run_dir / runfiles.FAILED)


def run_state(run_dir: Path) -> RunState:
    run_dir = Path(run_dir)
    if (run_dir / runfiles.DONE).exists():
        return RunState(State.DONE)
    info, alive = runfiles.lock_holder(run_dir)
    if alive:
        return RunState(State.RUNNING, f"pid {info.get('pid')} on {info.get('host', '?')}")
    submitted = runfiles.pending_submission(run_dir)
    if submitted is not None:
        return RunState(State.RUNNING, f"queued as Slurm job {submitted.get('job_id') or '?'} (pending)")
    if (run_dir / runfiles.FAILED).exists():
        return RunState(State.FAILED, failure_reason(run_dir) or "failed (no reason recorded)")
    if info is not None:
        where = f"process {info.get('pid', '?')} on {info.get('host', '?')}"
        last = last_line(run_dir / "err.txt")
        return RunState(State.FAILED, f"crashed: {where} is gone" + (f"; last error line: {last}" if last else
                                                                       " (killed, or out of memory?)"))
    if (run_dir / runfiles.RESULTS).exists() or (run_dir / runfiles.RESUME).exists():
        return RunState(State.FAILED, "incomplete: records but no done file and no lock (interrupted)")
    return RunState(State.NOT_LAUNCHED)


def job_states(jobs: Sequence[Job]) -> list[RunState]:
    return [_same_configuration(job, run_state(job.run_dir)) for job in jobs]


def _same_configuration(job: Job, state: RunState) -> RunState:
    """A done run counts as this job's only when its fingerprint is the job's: the run hash covers the
    arguments, the fingerprint also the resolved hyperparameters, so a run made under other defaults (an
    older dfbench) is never taken for done and never mixes into this sweep's tables unannounced."""
    if state.state != State.DONE:
        return state
    try:
        runfiles.check_fingerprint(job.run_dir, run_fingerprint(job.args, resolve_hparams(job.args)))
    except DfbenchError as err:
        return RunState(State.FAILED, f"done under another configuration, so not counted for this sweep: {err} "
                                      f"Delete {job.run_dir} to run it again.")
    return state


def count_states(states: Sequence[RunState]) -> dict[State, int]:
    counts = {state: 0 for state in State}
    for s in states:
        counts[s.state] += 1
    return counts


STATUS_ORDER = (State.DONE, State.RUNNING, State.FAILED, State.NOT_LAUNCHED)


def format_counts(counts: Mapping[State, int]) -> str:
    return ", ".join(f"{counts[s]} {s.value}" for s in STATUS_ORDER)


def print_status(spec: SweepSpec, jobs: Sequence[Job], states: Sequence[RunState] | None = None,
                 max_failed: int = 20, file=None) -> dict[State, int]:
    file = file or sys.stdout
    states = job_states(jobs) if states is None else states
    counts = count_states(states)
    print(f"sweep {spec.name} ({spec.output_dir}): {len(jobs)} jobs", file=file)
    for s in STATUS_ORDER:
        print(f"  {s.value:<13}{counts[s]:>7}", file=file)
    failed = [(j, s) for j, s in zip(jobs, states) if s.state == State.FAILED]
    if failed:
        print(f"failed runs ({len(failed)}; relaunch resumes them, delete-incomplete removes them):", file=file)
        for job, s in failed[:max_failed]:
            print(f"  {job.run_dir.name}  {job.describe()}\n      {s.reason}", file=file)
        if len(failed) > max_failed:
            print(f"  ... and {len(failed) - max_failed} more", file=file)
    return counts


def delete_incomplete(jobs: Sequence[Job], yes: bool = False, file=None) -> list[Path]:
    """Remove the run dirs of failed/crashed runs; never a running or a done one."""
    file = file or sys.stdout
    doomed = [job for job, s in zip(jobs, job_states(jobs)) if s.state == State.FAILED]
    if not doomed:
        print("no failed or crashed runs to delete", file=file)
        return []
    for job in doomed:
        print(f"  {job.run_dir}  {job.describe()}", file=file)
    if not yes:
        if not sys.stdin.isatty():
            raise DfbenchError(f"{len(doomed)} run dirs would be deleted; pass --yes to confirm")
        if input(f"delete these {len(doomed)} run dirs? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing deleted", file=file)
            return []
    removed = []
    for job in doomed:
        if run_state(job.run_dir).state == State.FAILED:  # it may have been relaunched meanwhile
            shutil.rmtree(job.run_dir, ignore_errors=True)
            removed.append(job.run_dir)
    print(f"deleted {len(removed)} run dirs", file=file)
    return removed
