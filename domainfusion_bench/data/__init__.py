"""Datasets behind one MultiDomainDataset API; importing this package registers them all."""

from __future__ import annotations

from pathlib import Path

from domainfusion_bench.data import embedded, folder, mnist, synthetic  # noqa: F401  (registers datasets)
from domainfusion_bench.data.base import DATASETS, MultiDomainDataset, register_dataset
from domainfusion_bench.data.folder import FolderDataset, ImageFolderDataset

FOLDER_PREFIX = "folder:"


def dataset_class(name: str) -> type[MultiDomainDataset]:
    """The class behind a dataset name, without loading data (hyperparameters need only this)."""
    if name.startswith(FOLDER_PREFIX):
        return FolderDataset
    return DATASETS.get(name)


def run_identity(args: dict) -> dict:
    """Training arguments plus the dataset's construction version when it was rebuilt (version > 1):
    what run hashes and fingerprints cover, so runs on another version of a dataset never mix."""
    version = getattr(dataset_class(args["dataset"]), "VERSION", 1)
    return {**args, "dataset_version": version} if version != 1 else dict(args)


def get_dataset(name: str, data_dir: str | Path) -> MultiDomainDataset:
    """Load ``name`` from ``data_dir``; ``folder:<path>`` loads any folder in DomainBed's layout."""
    if name.startswith(FOLDER_PREFIX):
        return FolderDataset(name[len(FOLDER_PREFIX):])
    cls = DATASETS.get(name)
    if issubclass(cls, ImageFolderDataset):
        return cls.from_data_dir(data_dir)
    return cls(data_dir)


__all__ = ["DATASETS", "MultiDomainDataset", "register_dataset", "dataset_class", "get_dataset", "run_identity"]
