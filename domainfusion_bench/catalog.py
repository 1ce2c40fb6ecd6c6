"""What `dfbench list` prints: algorithms, datasets with domains and sizes, and what each needs."""

from __future__ import annotations

from domainfusion_bench.algorithms import ALGORITHMS, load_plugins
from domainfusion_bench.data import DATASETS, get_dataset
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.paths import DEFAULT_DATA_DIR


def dataset_rows(data_dir: str) -> list[tuple[str, str, str, str]]:
    rows = []
    for name, cls in DATASETS.items():
        try:
            ds = get_dataset(name, data_dir)
            domains = ", ".join(f"{d} ({n})" for d, n in zip(ds.domains, ds.sizes()))
            status = f"{sum(ds.sizes())} images, {ds.num_classes} classes"
        except DfbenchError:
            domains = ", ".join(cls.DOMAINS)
            status = "not found"
        rows.append((name, domains, status, cls.NEEDS))
    return rows


def print_catalog(data_dir: str | None = None, plugins=()) -> None:
    load_plugins(plugins)
    data_dir = data_dir or DEFAULT_DATA_DIR
    print("Algorithms:")
    for name, cls in ALGORITHMS.items():
        doc = (cls.__doc__ or "").strip().splitlines()
        print(f"  {name:<16} {doc[0] if doc else ''}  [needs: {cls.NEEDS}]")
    print(f"\nDatasets (data dir {data_dir}):")
    for name, domains, status, needs in dataset_rows(data_dir):
        print(f"  {name:<16} {status}; needs: {needs}\n  {'':<16} domains: {domains}")
    print("  folder:<path>    any folder laid out as <path>/<domain>/<class>/<image>")
