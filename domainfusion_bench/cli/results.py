"""``dfbench collect`` and ``dfbench bench``: leaderboard tables from records, and throughput measurements."""

from __future__ import annotations

import sys

from domainfusion_bench.errors import DfbenchError


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


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="throughput: training vs ceiling, eval, memory; fast vs DomainBed settings; collector")
    p.add_argument("--dataset", default="synthetic-pacs", help="registered name or folder:<path> (default: %(default)s, generated)")
    p.add_argument("--algorithm", default="ERM")
    p.add_argument("--backbone", default="resnet50",
                   help="resnet50 | resnet18 | cnn | diti_encoder | timm:<model name> (untrained weights: speed only)")
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
