"""Image-folder datasets in DomainBed's layout: ``root/<domain>/<class>/<image>``.

The fast path (``load_store``): small datasets are decoded and resized once into a uint8 tensor store,
cached on disk, so training never decodes a JPEG again; augmentation and normalisation then run batched
on the training device (``batch_transform``, data/augment.py), from per-step seeded generators. The
store holds two copies: one at the training resolution (evaluation, as DomainBed's Resize) and one
large enough to crop from (``crop_envs``), so training crops keep the original images' detail.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T
from torchvision.transforms import v2

from domainfusion_bench.data.augment import (  # noqa: F401 - AugmentBatch, crop_params: re-exported
    CROP_SCALE, GRAY_P, IMAGENET_MEAN, IMAGENET_STD, JITTER, AugmentBatch, NormalizeBatch, crop_params,
    crop_source_size)
from domainfusion_bench.data.base import MultiDomainDataset, register_dataset
from domainfusion_bench.errors import DfbenchError


class _DecodeResized(Dataset):
    """Image k decoded (ImageFolder's loader) and resized as the eval transform does, as uint8 CHW."""

    def __init__(self, paths: list[str], loader, resolution: int):
        self.paths, self.loader = paths, loader
        self.resize = T.Resize((resolution, resolution))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int) -> torch.Tensor:
        return T.functional.pil_to_tensor(self.resize(self.loader(self.paths[k])))



def _save_npy(path: Path, tensor: torch.Tensor) -> None:
    """A cache file, written whole or not at all (parallel runs may build the same one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, tensor.numpy())
    os.replace(tmp, path)

class ImageFolderDataset(MultiDomainDataset):
    """Domains are the sorted subfolders of ``root`` (as DomainBed); classes must match across domains."""

    NORMALIZATION = (IMAGENET_MEAN, IMAGENET_STD)
    SUBDIR = ""  # folder under the data dir, DomainBed's name for it
    resolution = 224

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DfbenchError(self._missing_message())
        self.domains = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self._check_domains()
        self.envs = [self._load_domain(d) for d in self.domains]
        self.classes = list(self.envs[0].classes)
        for domain, env in zip(self.domains, self.envs):
            if list(env.classes) != self.classes:
                missing = sorted(set(self.classes) ^ set(env.classes))
                raise DfbenchError(
                    f"{self.root}: domain {domain!r} has different classes than {self.domains[0]!r} "
                    f"(differing: {', '.join(missing)}). Every domain needs the same class folders."
                )
        self.num_classes = len(self.classes)
        self.input_shape = (3, self.resolution, self.resolution)
        self.stored = False

    def set_resolution(self, resolution: int) -> None:
        """Train and evaluate at ``resolution`` px (DomainBed: 224); call before ``load_store``."""
        if self.stored:
            raise RuntimeError("set_resolution after load_store: the store holds the old resolution")
        self.resolution = resolution
        self.input_shape = (3, resolution, resolution)

    def store_bytes(self, cache_dir: str | Path | None = None) -> int:
        """Size of the uint8 store (both copies) at the current resolution; without ``cache_dir`` (where
        the images' sizes are read once and cached) the crop copy is counted at its largest."""
        sizes = None if cache_dir is None else self._sizes(cache_dir)
        largest = 10**9 if sizes is None else int(sizes.max()) if len(sizes) else 1
        crop = crop_source_size(self.resolution, largest)
        return sum(len(env) for env in self.envs) * 3 * (self.resolution**2 + (crop**2 if crop != self.resolution else 0))

    def _paths_digest(self) -> tuple[list[str], str]:
        """Every image path and the store's cache key (kept: after ``load_store`` the envs hold tensors)."""
        if getattr(self, "_paths_key", None) is None:
            paths = [p for env in self.envs for p, _ in env.samples]
            key = json.dumps([str(self.root.resolve()), [[p, os.path.getsize(p)] for p in paths]])
            self._paths_key = paths, hashlib.md5(key.encode()).hexdigest()[:16]
        return self._paths_key

    def _sizes(self, cache_dir: str | Path) -> torch.Tensor:
        paths, digest = self._paths_digest()
        return self._original_sizes(paths, Path(cache_dir) / f"images_{digest}_sizes.npy")

    def load_store(self, cache_dir: str | Path, num_workers: int = 0) -> Path:
        """Decode and resize every image once into uint8 tensors; ``envs`` (training resolution) and
        ``crop_envs`` (the crop copy, ``crop_source_size``) become TensorDatasets that know each image's
        original (height, width).

        The store is cached in ``cache_dir`` under a key of the root, the size and every file's path and
        size, so the runs of a sweep decode the dataset once between them. Returns the path of the copy
        at the training resolution.
        """
        samples = [env.samples for env in self.envs]
        paths, digest = self._paths_digest()
        path = Path(cache_dir) / f"images_{self.resolution}px_{digest}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        images = self._decoded(paths, self.resolution, path, num_workers)
        originals = self._sizes(cache_dir)
        self.crop_size = crop_source_size(self.resolution, int(originals.max()) if len(originals) else 1)
        # every original at the copy's size: its crops are DomainBed's (else resized into the copy first)
        self.crop_copy_is_original = bool((originals == self.crop_size).all())
        crop_path = path.with_name(f"images_{self.crop_size}px_{digest}.npy")
        crops = images if self.crop_size == self.resolution else self._decoded(paths, self.crop_size, crop_path,
                                                                               num_workers)
        start, self.envs, self.crop_envs = 0, [], []
        for env in samples:
            labels = torch.tensor([y for _, y in env], dtype=torch.long)
            for copy, envs in ((images, self.envs), (crops, self.crop_envs)):
                stored = TensorDataset(copy[start:start + len(env)], labels)
                stored.original_sizes = originals[start:start + len(env)]  # crops are drawn on these
                envs.append(stored)
            start += len(env)
        self.stored = True
        return path

    def _decoded(self, paths: list[str], size: int, path: Path, num_workers: int) -> torch.Tensor:
        """Every image resized to ``size`` x ``size`` as uint8, from the cache file ``path`` or decoded into it."""
        if path.exists():
            return torch.from_numpy(np.load(path))
        decode = _DecodeResized(paths, self.envs[0].loader, size)
        images = torch.cat(list(DataLoader(decode, batch_size=64, num_workers=num_workers)))
        _save_npy(path, images)
        return images

    @staticmethod
    def _original_sizes(paths: list[str], cache: Path) -> torch.Tensor:
        """(height, width) of every image file, from its header (cached beside the store)."""
        if cache.exists():
            sizes = torch.from_numpy(np.load(cache))
            if len(sizes) == len(paths):
                return sizes
        from PIL import Image

        hw = []
        for p in paths:
            with Image.open(p) as im:
                hw.append((im.height, im.width))
        sizes = torch.tensor(hw, dtype=torch.int64).reshape(-1, 2)
        _save_npy(cache, sizes)
        return sizes

    def batch_transform(self, augment: bool):
        """Batched, on-device equivalent of the per-image transform, for a stored dataset (else None)."""
        if not self.stored:
            return None
        return AugmentBatch(self.resolution) if augment else NormalizeBatch()

    def _load_domain(self, domain: str) -> tv_datasets.ImageFolder:
        try:
            return tv_datasets.ImageFolder(str(self.root / domain))
        except FileNotFoundError as err:  # no class folders, or a class folder without images
            raise DfbenchError(
                f"{self.root}: domain {domain!r} is incomplete ({err.args[0].strip()}). Every domain needs the "
                f"same <class> folders, each holding images."
            ) from None

    def _missing_message(self) -> str:
        return (
            f"{self.name} not found at {self.root} (expected {self.root}/<domain>/<class>/<image>). "
            f"Get it with: dfbench download {self.name} --data_dir {self.root.parent}"
        )

    def _check_domains(self) -> None:
        if not self.domains:
            raise DfbenchError(f"{self.root} has no domain folders. {self._missing_message()}")
        if self.DOMAINS and self.domains != sorted(self.DOMAINS):
            raise DfbenchError(
                f"{self.root} has domains {self.domains}, but {self.name} has {sorted(self.DOMAINS)}. "
                f"Remove or rename the extra folders, or re-run: dfbench download {self.name}"
            )

    def eval_transform(self):
        if self.stored:  # the store holds the resized uint8 images: the rest of ToTensor + Normalize
            return T.Compose([T.ConvertImageDtype(torch.float32), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        return T.Compose(
            [T.Resize((self.resolution, self.resolution)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        )

    def train_transform(self, augment: bool):
        if not augment:
            return self.eval_transform()
        if self.stored:  # per image, on uint8 tensors (algorithms that read items; the trainer batches)
            return v2.Compose([
                v2.RandomResizedCrop(self.resolution, scale=CROP_SCALE, antialias=True), v2.RandomHorizontalFlip(),
                v2.ColorJitter(JITTER, JITTER, JITTER, JITTER), v2.RandomGrayscale(GRAY_P),
                v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ])
        return T.Compose(
            [
                T.RandomResizedCrop(self.resolution, scale=(0.7, 1.0)),
                T.RandomHorizontalFlip(),
                T.ColorJitter(0.3, 0.3, 0.3, 0.3),
                T.RandomGrayscale(),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    @classmethod
    def from_data_dir(cls, data_dir: str | Path) -> "ImageFolderDataset":
        return cls(Path(data_dir) / cls.SUBDIR)


class FolderDataset(ImageFolderDataset):
    """Any folder in DomainBed's layout, with no code: ``--dataset folder:<path>``."""

    def __init__(self, root: str | Path):
        self.display_name = f"folder:{root}"
        super().__init__(root)

    @property
    def name(self) -> str:
        return self.display_name

    def _missing_message(self) -> str:
        return f"{self.root} is not a directory (folder datasets need <path>/<domain>/<class>/<image>)."


@register_dataset("PACS")
class PACS(ImageFolderDataset):
    SUBDIR = "PACS"
    DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
    NEEDS = "download: dfbench download PACS"


@register_dataset("VLCS")
class VLCS(ImageFolderDataset):
    SUBDIR = "VLCS"
    DOMAINS = ("Caltech101", "LabelMe", "SUN09", "VOC2007")
    NEEDS = "download: dfbench download VLCS"


@register_dataset("OfficeHome")
class OfficeHome(ImageFolderDataset):
    SUBDIR = "office_home"
    DOMAINS = ("Art", "Clipart", "Product", "Real World")
    NEEDS = "download: dfbench download OfficeHome"


@register_dataset("TerraIncognita")
class TerraIncognita(ImageFolderDataset):
    SUBDIR = "terra_incognita"
    DOMAINS = ("location_100", "location_38", "location_43", "location_46")
    NEEDS = "download: dfbench download TerraIncognita"


@register_dataset("DomainNet")
class DomainNet(ImageFolderDataset):
    SUBDIR = "domain_net"
    DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
    CHECKPOINT_FREQ = 1000
    NEEDS = "download: dfbench download DomainNet"
