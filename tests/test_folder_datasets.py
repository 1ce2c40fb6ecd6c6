"""Folder datasets in DomainBed's layout, on small generated image folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from domainfusion_bench.data import DATASETS, dataset_class, get_dataset
from domainfusion_bench.data.folder import PACS, FolderDataset, ImageFolderDataset
from domainfusion_bench.errors import DfbenchError

PACS_CLASSES = ["dog", "elephant", "giraffe"]


def write_image(path: Path, seed: int) -> None:
    """A small RGB image, JPEG or PNG by the suffix, different for every seed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (12, 10, 3), generator=g, dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)


def make_image_folder(root: Path, domains, classes, per_class: int = 2, suffix: str = ".jpg") -> int:
    """``root/<domain>/<class>/<image>``; returns the number of images written."""
    n = 0
    for domain in domains:
        for cls in classes:
            for k in range(per_class):
                write_image(root / domain / cls / f"{cls}_{k}{suffix}", seed=n)
                n += 1
    return n


@pytest.fixture
def pacs_dir(tmp_path):
    make_image_folder(tmp_path / "PACS", PACS.DOMAINS, PACS_CLASSES, per_class=2)
    return tmp_path


def test_pacs_loads_domains_classes_sizes(pacs_dir):
    ds = get_dataset("PACS", pacs_dir)
    assert isinstance(ds, PACS) and ds.name == "PACS"
    assert ds.domains == ["art_painting", "cartoon", "photo", "sketch"]
    assert ds.classes == PACS_CLASSES and ds.num_classes == 3
    assert ds.sizes() == [6, 6, 6, 6] and len(ds) == 4
    assert ds.input_shape == (3, 224, 224)
    image, label = ds[2][5]  # photo/giraffe/giraffe_1.jpg
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 2
    for transform in (ds.eval_transform(), ds.train_transform(augment=True), ds.train_transform(augment=False)):
        x = transform(image)
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32


def test_small_resolution_attribute(pacs_dir, monkeypatch):
    monkeypatch.setattr(PACS, "resolution", 32)
    ds = get_dataset("PACS", pacs_dir)
    assert ds.input_shape == (3, 32, 32)
    assert ds.train_transform(augment=True)(ds[0][0][0]).shape == (3, 32, 32)


def test_png_images_load(tmp_path):
    make_image_folder(tmp_path / "PACS", PACS.DOMAINS, PACS_CLASSES, per_class=1, suffix=".png")
    assert get_dataset("PACS", tmp_path).sizes() == [3, 3, 3, 3]


@pytest.mark.parametrize("name", ["VLCS", "OfficeHome", "TerraIncognita", "DomainNet"])
def test_every_folder_dataset_reads_its_layout(tmp_path, name):
    cls = DATASETS.get(name)
    make_image_folder(tmp_path / cls.SUBDIR, cls.DOMAINS, ["a", "b"], per_class=1)
    ds = get_dataset(name, tmp_path)
    assert ds.domains == sorted(cls.DOMAINS) and ds.sizes() == [2] * len(cls.DOMAINS)


def test_domain_mismatch_is_a_clear_error(pacs_dir):
    make_image_folder(pacs_dir / "PACS", ["painting"], PACS_CLASSES, per_class=1)
    with pytest.raises(DfbenchError, match="has domains .*'painting'.*dfbench download PACS"):
        get_dataset("PACS", pacs_dir)


def test_missing_domain_is_a_clear_error(tmp_path):
    make_image_folder(tmp_path / "PACS", PACS.DOMAINS[:3], PACS_CLASSES, per_class=1)
    with pytest.raises(DfbenchError, match="PACS has .*'sketch'"):
        get_dataset("PACS", tmp_path)


def test_class_mismatch_is_a_clear_error(pacs_dir):
    make_image_folder(pacs_dir / "PACS", ["sketch"], ["horse"], per_class=1)
    with pytest.raises(DfbenchError, match="domain 'sketch' has different classes.*horse"):
        get_dataset("PACS", pacs_dir)


def test_domain_without_images_is_a_clear_error(pacs_dir):
    (pacs_dir / "PACS" / "sketch" / "dog").mkdir(exist_ok=True)
    for image in (pacs_dir / "PACS" / "sketch" / "dog").iterdir():
        image.unlink()
    with pytest.raises(DfbenchError, match="domain .sketch. is incomplete .*classes dog"):
        get_dataset("PACS", pacs_dir)


def test_missing_data_dir_names_the_download_command(tmp_path):
    with pytest.raises(DfbenchError, match=r"PACS not found at .*dfbench download PACS --data_dir"):
        get_dataset("PACS", tmp_path / "nowhere")


def test_folder_dataset_domains_are_sorted_subfolders(tmp_path):
    root = tmp_path / "mine"
    make_image_folder(root, ["zebra_park", "alpha", "middle"], ["cat", "dog"], per_class=2, suffix=".png")
    (root / ".cache").mkdir()  # hidden folders are not domains
    ds = get_dataset(f"folder:{root}", tmp_path / "ignored")
    assert isinstance(ds, FolderDataset)
    assert ds.domains == ["alpha", "middle", "zebra_park"]
    assert ds.classes == ["cat", "dog"] and ds.sizes() == [4, 4, 4]
    assert ds.name == f"folder:{root}"
    assert ds.eval_transform()(ds[1][0][0]).shape == (3, 224, 224)


def test_folder_dataset_missing_path(tmp_path):
    with pytest.raises(DfbenchError, match="is not a directory"):
        get_dataset(f"folder:{tmp_path / 'nope'}", tmp_path)


def test_dataset_class_needs_no_data(tmp_path):
    assert dataset_class("PACS") is PACS
    assert dataset_class("folder:/does/not/exist") is FolderDataset
    assert issubclass(dataset_class("DomainNet"), ImageFolderDataset)
    with pytest.raises(DfbenchError, match="unknown dataset 'PCAS'.*Did you mean 'PACS'"):
        dataset_class("PCAS")
