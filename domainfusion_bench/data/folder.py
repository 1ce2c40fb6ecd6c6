"""Image-folder datasets in DomainBed's layout: ``root/<domain>/<class>/<image>``."""

from __future__ import annotations

from pathlib import Path

from torchvision import datasets as tv_datasets
from torchvision import transforms as T

from domainfusion_bench.data.base import MultiDomainDataset, register_dataset
from domainfusion_bench.errors import DfbenchError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolderDataset(MultiDomainDataset):
    """Domains are the sorted subfolders of ``root`` (as DomainBed); classes must match across domains."""

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
        return T.Compose(
            [T.Resize((self.resolution, self.resolution)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        )

    def train_transform(self, augment: bool):
        if not augment:
            return self.eval_transform()
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
