"""``dfbench list``, ``dfbench download`` and ``dfbench datasets preview``: what data there is, getting it,
looking at it."""

from __future__ import annotations


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
