"""Image-folder datasets in DomainBed's layout: ``root/<domain>/<class>/<image>``.

The fast path (``load_store``): small datasets are decoded and resized once into a uint8 tensor store,
cached on disk, so training never decodes a JPEG again; augmentation and normalisation then run batched
on the training device (``batch_transform``), from per-step seeded generators.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T
from torchvision.ops import roi_align
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F2

try:  # batched per-sample hue needs torchvision's HSV helpers; they are private, so they may move
    from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv
except ImportError:
    _hsv_to_rgb = _rgb_to_hsv = None

from domainfusion_bench.data.base import MultiDomainDataset, register_dataset
from domainfusion_bench.errors import DfbenchError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DomainBed's training augmentation parameters (DESIGN.md section 3)
CROP_SCALE, CROP_RATIO, JITTER, GRAY_P = (0.7, 1.0), (3 / 4, 4 / 3), 0.3, 0.1


class NormalizeBatch:
    """uint8 [N, 3, H, W] -> normalised float: the same ops as ToTensor + Normalize, so the same values."""

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return T.functional.normalize(x.float().div(255), IMAGENET_MEAN, IMAGENET_STD)


CROP_TRIES = 10  # torchvision's RandomResizedCrop.get_params: 10 tries, then a centre crop


def crop_params(heights: torch.Tensor, widths: torch.Tensor, generator: torch.Generator | None = None,
                scale: tuple[float, float] = CROP_SCALE, ratio: tuple[float, float] = CROP_RATIO) -> torch.Tensor:
    """RandomResizedCrop boxes (i, j, h, w) per image, by torchvision's own rule on each image's size:
    area fraction ~ U(scale), log aspect ~ U(log ratio), w and h rounded, up to 10 tries for a box that
    fits, then the centre crop with the aspect clamped into ``ratio``; the corner uniform over integer
    positions. Vectorised over images (all tries drawn at once); returns float [N, 4]."""
    n, device = len(heights), heights.device
    H, W = heights.double()[:, None], widths.double()[:, None]
    u = lambda *shape: torch.rand(*shape, generator=generator, device=device, dtype=torch.float64)  # noqa: E731
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u(n, CROP_TRIES))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u(n, CROP_TRIES))
    w, h = torch.round((area * aspect).sqrt()), torch.round((area / aspect).sqrt())
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = torch.where(fits.any(1), fits.double().argmax(1), torch.full((n,), -1, device=device))
    take = first.clamp(min=0)[:, None]
    w, h = w.gather(1, take)[:, 0], h.gather(1, take)[:, 0]
    H, W = H[:, 0], W[:, 0]
    i = torch.floor(u(n) * (H - h + 1))
    j = torch.floor(u(n) * (W - w + 1))
    # fallback: centre crop, aspect clamped into [ratio[0], ratio[1]]
    in_ratio = W / H
    fw = torch.where(in_ratio < ratio[0], W, torch.where(in_ratio > ratio[1], torch.round(H * ratio[1]), W))
    fh = torch.where(in_ratio < ratio[0], torch.round(W / ratio[0]), H)
    fall = first < 0
    h, w = torch.where(fall, fh, h), torch.where(fall, fw, w)
    i = torch.where(fall, torch.div(H - h, 2, rounding_mode="floor"), i)
    j = torch.where(fall, torch.div(W - w, 2, rounding_mode="floor"), j)
    return torch.stack([i, j, h, w], 1).float()


class AugmentBatch:
    """DomainBed's training augmentation on a uint8 batch, on its device, with per-sample parameters.

    RandomResizedCrop, horizontal flip, ColorJitter(0.3 x4) and RandomGrayscale(0.1), drawn from
    ``generator``. Crop boxes follow torchvision's rule (``crop_params``, retries included) on each
    image's ORIGINAL size when ``original_sizes`` ((height, width) per image of the batch; the store
    records them) is given, mapped onto the stored (resized) copy and resampled with ``roi_align``;
    without it, on the stored size. The jitter order is drawn per batch (torchvision: per image).
    """

    def __init__(self, resolution: int):
        self.resolution = resolution

    def boxes(self, x: torch.Tensor, generator: torch.Generator | None = None,
              original_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """roi_align boxes (index, x0, y0, x1, y1) on the stored copy of each image of the batch."""
        n, _, h, w = x.shape
        if original_sizes is not None:
            orig = original_sizes.to(x.device).double()
        else:
            orig = torch.tensor([[h, w]], device=x.device, dtype=torch.float64).expand(n, 2)
        i, j, ch, cw = crop_params(orig[:, 0], orig[:, 1], generator).double().unbind(1)
        sy, sx = h / orig[:, 0], w / orig[:, 1]  # original pixels -> stored pixels
        return torch.stack([torch.arange(n, device=x.device, dtype=torch.float64), j * sx, i * sy, (j + cw) * sx,
                            (i + ch) * sy], 1).to(torch.float32)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None,
                 original_sizes: torch.Tensor | None = None) -> torch.Tensor:
        n = len(x)
        u = lambda: torch.rand(n, generator=generator, device=x.device)  # noqa: E731
        boxes = self.boxes(x, generator, original_sizes)
        x = x.float().div(255)
        x = roi_align(x, boxes, (self.resolution, self.resolution), spatial_scale=1.0, sampling_ratio=2, aligned=True)
        x = torch.where((u() < 0.5)[:, None, None, None], x.flip(-1), x)
        factors = [1 - JITTER + 2 * JITTER * u() for _ in range(3)] + [JITTER * (2 * u() - 1)]
        order = [0, 1, 2, 3]
        random.Random(generator.initial_seed() if generator is not None else 0).shuffle(order)
        for op in order:
            x = self._jitter(x, op, factors[op][:, None, None, None])
        gray = F2.rgb_to_grayscale(x, num_output_channels=3)
        x = torch.where((u() < GRAY_P)[:, None, None, None], gray, x)
        return T.functional.normalize(x, IMAGENET_MEAN, IMAGENET_STD)

    @staticmethod
    def _jitter(x: torch.Tensor, op: int, f: torch.Tensor) -> torch.Tensor:
        if op == 0:  # brightness
            return (x * f).clamp(0, 1)
        if op == 1:  # contrast: blend with the mean grey level
            mean = F2.rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
            return (f * x + (1 - f) * mean).clamp(0, 1)
        if op == 2:  # saturation: blend with the grey image
            return (f * x + (1 - f) * F2.rgb_to_grayscale(x)).clamp(0, 1)
        if _rgb_to_hsv is None:  # hue, one sample at a time through the public API
            return torch.stack([F2.adjust_hue(xi, float(fi)) for xi, fi in zip(x, f.flatten())])
        hsv = _rgb_to_hsv(x)  # hue: rotate H
        hsv = torch.cat([(hsv[:, :1] + f).remainder(1.0), hsv[:, 1:]], 1)
        return _hsv_to_rgb(hsv)


class _DecodeResized(Dataset):
    """Image k decoded (ImageFolder's loader) and resized as the eval transform does, as uint8 CHW."""

    def __init__(self, paths: list[str], loader, resolution: int):
        self.paths, self.loader = paths, loader
        self.resize = T.Resize((resolution, resolution))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int) -> torch.Tensor:
        return T.functional.pil_to_tensor(self.resize(self.loader(self.paths[k])))


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

    def store_bytes(self) -> int:
        """Size of the uint8 store at the current resolution."""
        return sum(len(env) for env in self.envs) * 3 * self.resolution**2

    def load_store(self, cache_dir: str | Path, num_workers: int = 0) -> Path:
        """Decode and resize every image once into uint8 tensors; ``envs`` become TensorDatasets.

        The store is cached in ``cache_dir`` under a key of the root, the resolution and every file's
        path and size, so the runs of a sweep decode the dataset once between them.
        """
        samples = [env.samples for env in self.envs]
        paths = [p for env in samples for p, _ in env]
        key = json.dumps([str(self.root.resolve()), self.resolution, [[p, os.path.getsize(p)] for p in paths]])
        digest = hashlib.md5(key.encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"images_{self.resolution}px_{digest}.npy"
        if path.exists():
            images = torch.from_numpy(np.load(path))
        else:
            decode = _DecodeResized(paths, self.envs[0].loader, self.resolution)
            images = torch.cat(list(DataLoader(decode, batch_size=64, num_workers=num_workers)))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            with open(tmp, "wb") as f:
                np.save(f, images.numpy())
            os.replace(tmp, path)
        originals = self._original_sizes(paths, path.with_name(path.stem + "_sizes.npy"))
        start, envs = 0, []
        for env in samples:
            labels = torch.tensor([y for _, y in env], dtype=torch.long)
            stored = TensorDataset(images[start:start + len(env)], labels)
            stored.original_sizes = originals[start:start + len(env)]  # crops are drawn on these (AugmentBatch)
            envs.append(stored)
            start += len(env)
        self.envs, self.stored = envs, True
        return path

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
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.save(f, sizes.numpy())
        os.replace(tmp, cache)
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
