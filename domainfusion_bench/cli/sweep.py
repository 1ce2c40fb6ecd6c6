"""``dfbench sweep`` and ``dfbench demo``: a spec (with flags overriding its fields) run by a launcher."""

from __future__ import annotations

import sys


def _add_spec_overrides(p, spec_default: str | None = None) -> None:
    """--spec plus flags that override its fields (a flag left out keeps the spec's value)."""
    if spec_default is None:
        p.add_argument("--spec", required=True, help="sweep spec, e.g. sweeps/demo.yaml")
    else:
        p.add_argument("--spec", default=spec_default, help="sweep spec (default: %(default)s)")
    p.add_argument("--name", default=None, help="sweep name (default: the spec file's name)")
    p.add_argument("--datasets", nargs="+", default=None, metavar="NAME")
    p.add_argument("--algorithms", nargs="+", default=None, metavar="NAME", help="names, or `all`")
    p.add_argument("--n_hparams", type=int, default=None, help="hparams seeds n_hparams_from .. n_hparams-1")
    p.add_argument("--n_hparams_from", type=int, default=None)
    p.add_argument("--n_trials", type=int, default=None)
    p.add_argument("--test_envs", default=None, help="singles | singles+pairs | a YAML list such as '[[0], [1, 2]]'")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--checkpoint_freq", type=int, default=None)
    p.add_argument("--hparams", default=None,
                   help="JSON, merged into the spec's fixed hparams key by key: '{\"lr\": 1e-4}'")
    p.add_argument("--output_dir", default=None, help="default: results/<name>")
    p.add_argument("--data_dir", default=None, help="root of the datasets (default: datasets, or $DFBENCH_DATA)")
    p.add_argument("--trust-plugins", action="store_true",
                   help="run the spec's plugins (code) also without launching: for status, delete-incomplete and "
                        "the dry_run launcher of a sweep whose algorithms come from plugins")


def _spec_from(ns):
    import yaml

    from domainfusion_bench.errors import DfbenchError
    from domainfusion_bench.sweep import load_spec, load_yaml, with_plugins

    overrides = {k: getattr(ns, k) for k in ("name", "datasets", "algorithms", "n_hparams", "n_hparams_from",
                                             "n_trials", "steps", "checkpoint_freq", "output_dir", "data_dir")}
    if overrides["algorithms"] == ["all"]:
        overrides["algorithms"] = "all"
    for key in ("test_envs", "hparams"):
        text = getattr(ns, key)
        if text is not None:
            try:
                overrides[key] = load_yaml(text)
            except yaml.YAMLError:
                raise DfbenchError(f"--{key} {text!r} is not valid YAML/JSON") from None
    spec = load_spec(ns.spec, overrides)
    return with_plugins(spec) if ns.trust_plugins else spec


def _launcher_options(pairs) -> dict:
    import yaml

    from domainfusion_bench.errors import DfbenchError
    from domainfusion_bench.sweep import load_yaml

    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DfbenchError(f"-O {pair!r}: launcher options are KEY=VALUE, e.g. -O parallel=2")
        try:
            options[key] = load_yaml(value) if value else None
        except yaml.YAMLError:
            raise DfbenchError(f"-O {pair!r}: the value is not valid YAML") from None
    return options


def _add_launch_flags(p) -> None:
    p.add_argument("--launcher", default=None, help="local | multi_gpu | accelerate | slurm | dry_run (default: the spec's)")
    p.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="launcher option, repeatable, e.g. -O parallel=2 -O threads=1, -O partition=gpu")


def _sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="launch a sweep, show its status, delete crashed runs")
    ssub = p.add_subparsers(dest="sweep_command", required=True)
    launch = ssub.add_parser("launch", help="run every job not done or running (interrupted runs resume)")
    _add_spec_overrides(launch)
    _add_launch_flags(launch)
    launch.set_defaults(func=_run_sweep_launch)
    status = ssub.add_parser("status", help="per-state counts; the last error line of each failed run")
    _add_spec_overrides(status)
    status.set_defaults(func=_run_sweep_status)
    delete = ssub.add_parser("delete-incomplete", help="remove failed/crashed run dirs (never a running one)")
    _add_spec_overrides(delete)
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    delete.set_defaults(func=_run_sweep_delete)


def _run_sweep_launch(ns) -> None:
    from domainfusion_bench.launchers import launch_sweep

    result = launch_sweep(_spec_from(ns), ns.launcher, _launcher_options(ns.option))
    if result.failures:
        print(f"dfbench sweep: {len(result.failures)} run(s) failed; `dfbench sweep status --spec {ns.spec}` "
              "shows why, and launching again retries them", file=sys.stderr)
        sys.exit(1)


def _run_sweep_status(ns) -> None:
    from domainfusion_bench.sweep import make_jobs, print_status

    spec = _spec_from(ns)
    print_status(spec, make_jobs(spec))


def _run_sweep_delete(ns) -> None:
    from domainfusion_bench.sweep import delete_incomplete, make_jobs

    delete_incomplete(make_jobs(_spec_from(ns)), yes=ns.yes)


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the embedded default end to end: sweeps/demo.yaml, then the leaderboard")
    _add_spec_overrides(p, spec_default="sweeps/demo.yaml")
    _add_launch_flags(p)
    p.set_defaults(func=_run_demo)


def _run_demo(ns) -> None:
    import time
    import warnings
    from pathlib import Path

    from domainfusion_bench.collect import CollectWarning
    from domainfusion_bench.launchers import launch_sweep
    from domainfusion_bench.report import leaderboard, write_leaderboard

    start = time.time()
    spec = _spec_from(ns)
    result = launch_sweep(spec, ns.launcher, _launcher_options(ns.option))
    selection = ["iid", "oracle"]  # singles only: leave-one-domain-out needs the pair runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollectWarning)
        for suffix in (".md", ".html"):
            out = write_leaderboard(spec.output_dir, Path(spec.output_dir) / f"leaderboard{suffix}", selection=selection)
            print(f"wrote {out}", file=sys.stderr)
        text = leaderboard(spec.output_dir, "text", selection=selection)
    print(text)
    print(f"demo: {time.time() - start:.0f} s; {len(result.failures)} failed run(s)", file=sys.stderr)
    if result.failures:
        sys.exit(1)
