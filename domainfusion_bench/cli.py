"""The ``dfbench`` command. Parsing only: every subcommand calls one library function."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from domainfusion_bench.errors import DfbenchError


def _train_parser(sub) -> None:
    from domainfusion_bench.training import TrainArgs

    d = TrainArgs()
    p = sub.add_parser("train", help="train one run (DomainBed's train.py flags)")
    p.add_argument("--data_dir", default=d.data_dir, help="root of the datasets (default: %(default)s, or $DFBENCH_DATA)")
    p.add_argument("--dataset", default=d.dataset, help="registered name, or folder:<path> (see `dfbench list`)")
    p.add_argument("--algorithm", default=d.algorithm)
    p.add_argument("--test_envs", type=int, nargs="+", default=d.test_envs, help="held-out domain indices")
    p.add_argument("--hparams", default=None, help='JSON overrides, e.g. \'{"lr": 1e-4}\'')
    p.add_argument("--hparams_seed", type=int, default=d.hparams_seed, help="0 = defaults, else a random draw")
    p.add_argument("--trial_seed", type=int, default=d.trial_seed, help="seeds the splits and the hparam draw")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds everything else")
    p.add_argument("--steps", type=int, default=None, help="default: the dataset's (5001)")
    p.add_argument("--checkpoint_freq", type=int, default=None, help="default: the dataset's (300, 100 MNIST-sized)")
    p.add_argument("--holdout_fraction", type=float, default=d.holdout_fraction)
    p.add_argument("--output_dir", default=d.output_dir)
    p.add_argument("--skip_model_save", action="store_true")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels, no cudnn autotuning")
    p.add_argument("--eval_splits", choices=["needed", "all"], default=d.eval_splits,
                   help="needed: only what model selection reads; all: every in/out split")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=d.precision, help="auto: bf16 on CUDA")
    p.add_argument("--num_workers", type=int, default=None, help="data workers shared by all domains")
    p.add_argument("--eval_batch_size", type=int, default=None)
    p.add_argument("--plugins", nargs="*", default=[], help="Python files that register algorithms")
    p.add_argument("--eval_augment", action="store_true",
                   help="evaluate training domains' splits with the training transform (DomainBed's way)")
    p.set_defaults(func=_run_train)


def _run_train(ns) -> None:
    from domainfusion_bench.training import TrainArgs, train

    fields = {f.name for f in dataclasses.fields(TrainArgs)}
    train(TrainArgs(**{k: v for k, v in vars(ns).items() if k in fields}))


def _list_parser(sub) -> None:
    p = sub.add_parser("list", help="algorithms, datasets (domains, sizes) and what each needs")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--plugins", nargs="*", default=[])
    p.set_defaults(func=_run_list)


def _run_list(ns) -> None:
    from domainfusion_bench.catalog import print_catalog

    print_catalog(ns.data_dir, ns.plugins)


def _download_parser(sub) -> None:
    from domainfusion_bench.data.download import RECIPES

    p = sub.add_parser("download", help="download datasets into the data dir, in DomainBed's layout")
    p.add_argument("names", nargs="+", metavar="NAME", help=f"one or more of: {', '.join(RECIPES)}")
    p.add_argument("--data_dir", default=None, help="root of the datasets (default: datasets, or $DFBENCH_DATA)")
    p.add_argument("--mirror", default=None, metavar="DIR",
                   help="take the source files from DIR instead of the network (datasets/README.md lists the names)")
    p.add_argument("--keep_downloads", action="store_true",
                   help="keep the fetched files in <data_dir>/.dfbench_download/<name>/, a --mirror for other machines")
    p.set_defaults(func=_run_download)


def _run_download(ns) -> None:
    from domainfusion_bench.data.download import RECIPES, download

    for name in ns.names:
        RECIPES.get(name)  # every name is checked before the first download starts
    for name in ns.names:
        download(name, ns.data_dir, ns.mirror, keep_downloads=ns.keep_downloads)


def _datasets_parser(sub) -> None:
    p = sub.add_parser("datasets", help="look at a dataset: a PNG grid, one row per domain, one column per class")
    dsub = p.add_subparsers(dest="datasets_command", required=True)
    v = dsub.add_parser("preview", help="write a PNG grid of a dataset's domains (e.g. datasets/digitstyles.png)")
    v.add_argument("dataset", help="registered name, or folder:<path>")
    v.add_argument("--out", required=True, help="PNG file to write")
    v.add_argument("--data_dir", default=None, help="root of the datasets (default: datasets, or $DFBENCH_DATA)")
    v.add_argument("--columns", type=int, default=10, help="classes per row (default: %(default)s)")
    v.add_argument("--size", type=int, default=32, help="pixels per image before --scale (default: %(default)s)")
    v.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling (default: %(default)s)")
    v.set_defaults(func=lambda ns: print(_preview(ns)))


def _preview(ns) -> str:
    from domainfusion_bench.data import get_dataset
    from domainfusion_bench.data.preview import write_preview
    from domainfusion_bench.training import TrainArgs

    dataset = get_dataset(ns.dataset, ns.data_dir or TrainArgs().data_dir)
    return f"wrote {write_preview(dataset, ns.out, ns.columns, ns.size, ns.scale)}: rows {', '.join(dataset.domains)}"


def _collect_parser(sub) -> None:
    p = sub.add_parser("collect", help="leaderboard tables from run dirs (dfbench's or DomainBed's)")
    p.add_argument("input_dir", metavar="DIR", help="a sweep's output dir (searched recursively for results.jsonl)")
    p.add_argument("--format", choices=["text", "markdown", "latex", "csv", "json", "html"], default=None,
                   help="default: text, or what --out's suffix says (.md .tex .csv .json .html)")
    p.add_argument("--selection", choices=["iid", "loo", "oracle", "all"], default="all",
                   help="iid: training-domain validation; loo: leave-one-domain-out; oracle: test-domain "
                        "validation (default: all three)")
    p.add_argument("--error", choices=["domainbed", "sem", "ci95"], default="domainbed",
                   help="error bar over trials (default: DomainBed's std/sqrt(n))")
    p.add_argument("--out", default=None, help="write to FILE instead of stdout (.html means the HTML page)")
    p.add_argument("--include-incomplete", action="store_true", help="also read runs without a done file")
    p.add_argument("--costs", action="store_true", help="add cost tables: wall time, images/s, memory, cost_* keys")
    p.add_argument("--metrics", action="store_true",
                   help="add tables of the metric_* keys at the selected checkpoint (mean over test domains and trials)")
    p.set_defaults(func=_run_collect)


def _run_collect(ns) -> None:
    import warnings

    from domainfusion_bench.collect import CollectWarning
    from domainfusion_bench.report import format_for, leaderboard

    fmt = format_for(ns.out, ns.format)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CollectWarning)
        text = leaderboard(ns.input_dir, fmt=fmt, selection=ns.selection, error=ns.error, costs=ns.costs,
                           include_incomplete=ns.include_incomplete, metrics=ns.metrics)
    for w in caught:
        if issubclass(w.category, CollectWarning):
            print(f"dfbench collect: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if ns.out:
        from pathlib import Path

        out = Path(ns.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out} ({fmt})", file=sys.stderr)
    else:
        sys.stdout.write(text)


def _diffusion_parser(sub) -> None:
    p = sub.add_parser("diffusion", help="diffusion backbones: train the small pixel DDPM generative methods use")
    dsub = p.add_subparsers(dest="diffusion_command", required=True)
    t = dsub.add_parser("train", help="train (or find in the cache) the pixel DDPM for a dataset's training domains")
    t.add_argument("--dataset", required=True, help="registered name, or folder:<path>")
    t.add_argument("--test_envs", type=int, nargs="+", required=True, help="held-out domains: never seen by the model")
    t.add_argument("--steps", type=int, default=None, help="training steps (default: what CDGA uses, so its runs reuse it)")
    t.add_argument("--data_dir", default=None, help="root of the datasets (default: datasets, or $DFBENCH_DATA)")
    t.add_argument("--cache_dir", default=None, help="default: <data_dir>/.dfbench_cache (where training runs look)")
    t.add_argument("--trial_seed", type=int, default=0, help="seeds the in/out splits (train on in-splits only)")
    t.add_argument("--holdout_fraction", type=float, default=0.2)
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--preview", default=None, metavar="PNG", help="also write a grid of samples (class x domain)")
    t.set_defaults(func=_run_diffusion_train)


def _run_diffusion_train(ns) -> None:
    from domainfusion_bench.diffusion.factory import train_command
    from domainfusion_bench.paths import DEFAULT_DATA_DIR

    train_command(ns.dataset, ns.data_dir or DEFAULT_DATA_DIR, ns.test_envs, steps=ns.steps, cache_dir=ns.cache_dir,
                  trial_seed=ns.trial_seed, holdout_fraction=ns.holdout_fraction, device=ns.device, preview=ns.preview)


def _diti_parser(sub) -> None:
    p = sub.add_parser("diti", help="DiTi features: which time-step slices of z carry class and which carry domain")
    dsub = p.add_subparsers(dest="diti_command", required=True)
    t = dsub.add_parser("probe", help="linear probes per slice of z (fit on training in-splits, scored on their out-splits)")
    t.add_argument("--dataset", required=True, help="registered name, or folder:<path>")
    t.add_argument("--test_envs", type=int, nargs="+", required=True, help="held-out domains: never read")
    t.add_argument("--hparams", default=None, help="DiTi hyperparameters as JSON (the encoder of runs with the same ones)")
    t.add_argument("--data_dir", default=None, help="root of the datasets (default: datasets, or $DFBENCH_DATA)")
    t.add_argument("--cache_dir", default=None, help="default: <data_dir>/.dfbench_cache (where training runs look)")
    t.add_argument("--trial_seed", type=int, default=0)
    t.add_argument("--holdout_fraction", type=float, default=0.2)
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON")
    t.set_defaults(func=_run_diti_probe)


def _run_diti_probe(ns) -> None:
    from domainfusion_bench.algorithms.diti import probe_report
    from domainfusion_bench.paths import DEFAULT_DATA_DIR

    probe_report(ns.dataset, ns.data_dir or DEFAULT_DATA_DIR, ns.test_envs, hparams_json=ns.hparams,
                 trial_seed=ns.trial_seed, holdout_fraction=ns.holdout_fraction, cache_dir=ns.cache_dir,
                 device=ns.device, json_out=ns.json)


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


def _spec_from(ns):
    import yaml

    from domainfusion_bench.errors import DfbenchError
    from domainfusion_bench.sweep import load_spec, load_yaml

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
    return load_spec(ns.spec, overrides)


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


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="throughput: training vs ceiling, eval, memory; fast vs DomainBed settings; collector")
    p.add_argument("--dataset", default="synthetic-pacs", help="registered name or folder:<path> (default: %(default)s, generated)")
    p.add_argument("--algorithm", default="ERM")
    p.add_argument("--backbone", default="resnet50", help="resnet50 | resnet18 | cnn (untrained weights: speed only)")
    p.add_argument("--resolution", type=int, default=224, help="image size for folder datasets (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=32, help="per training domain, as DomainBed's (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps, after --warmup untimed ones")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--test_envs", type=int, nargs="+", default=[0])
    p.add_argument("--data_dir", default=None, help="root of the datasets (default: datasets, or $DFBENCH_DATA)")
    p.add_argument("--profile", choices=["fast", "domainbed", "both"], default="fast",
                   help="fast: dfbench's defaults; domainbed: fp32, no channels_last, 8 workers per loader, no pinned "
                        "memory, augmented all-split eval; both: side by side, with the ratio")
    p.add_argument("--num_workers", type=int, default=None, help="override every profile's worker count")
    p.add_argument("--hparams", default=None, help="more JSON hparam overrides, e.g. '{\"cnn_width\": 16}'")
    p.add_argument("--synthetic_per_class", type=int, default=None,
                   help="(re)generate synthetic-pacs with this many images per domain and class first")
    p.add_argument("--collect", type=int, default=None, metavar="N",
                   help="instead: time dfbench collect + selection on N generated records")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 on a busy CPU)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_run_bench)


def _run_bench(ns) -> None:
    import json
    from pathlib import Path

    from domainfusion_bench.bench import BenchOptions, bench_collector, format_report, run_bench
    from domainfusion_bench.bench.collector import format_collector
    from domainfusion_bench.paths import DEFAULT_DATA_DIR

    for flag in ("collect", "steps", "batch_size", "resolution", "num_workers", "threads", "synthetic_per_class",
                 "warmup"):
        value, least = getattr(ns, flag), 0 if flag in ("num_workers", "warmup") else 1
        if value is not None and value < least:
            raise DfbenchError(f"--{flag} must be an integer >= {least}, got {value}")
    if ns.collect is not None:
        result = bench_collector(ns.collect)
        print(json.dumps(result, indent=1) if ns.json else format_collector(result), end="\n" if ns.json else "")
        return
    data_dir = ns.data_dir or DEFAULT_DATA_DIR
    if ns.synthetic_per_class is not None:
        from domainfusion_bench.data.synthetic import SyntheticPACS, generate

        generate(Path(data_dir) / SyntheticPACS.SUBDIR, per_class=ns.synthetic_per_class)
    opts = BenchOptions(dataset=ns.dataset, algorithm=ns.algorithm, backbone=ns.backbone, resolution=ns.resolution,
                        batch_size=ns.batch_size, steps=ns.steps, warmup=ns.warmup, device=ns.device,
                        test_envs=ns.test_envs, data_dir=data_dir,
                        profiles=["fast", "domainbed"] if ns.profile == "both" else [ns.profile],
                        num_workers=ns.num_workers, hparams=ns.hparams, threads=ns.threads)
    import contextlib

    with contextlib.redirect_stdout(sys.stderr) if ns.json else contextlib.nullcontext():  # stdout: JSON only
        report = run_bench(opts)
    print(json.dumps(report, indent=1) if ns.json else format_report(report), end="\n" if ns.json else "")


PARSERS = [_list_parser, _train_parser, _collect_parser, _download_parser, _diffusion_parser, _diti_parser,
           _sweep_parser, _demo_parser, _bench_parser, _datasets_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfbench", description="DomainBed-compatible DG benchmark harness")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    ns = build_parser().parse_args(argv)
    try:
        ns.func(ns)
    except DfbenchError as err:
        print(f"dfbench {ns.command}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"dfbench {ns.command}: interrupted", file=sys.stderr)
        sys.exit(130)
