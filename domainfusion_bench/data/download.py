"""``dfbench download <name>``: DomainBed's sources and post-processing, resumable and verified.

Each dataset is a :class:`Recipe`: the files to fetch (:class:`Source`) and a ``build`` function that
turns them into the folder ``data/folder.py`` (or ``data/mnist.py``) reads. ``download`` runs a recipe:

1. a dataset whose folder holds the completion marker is skipped;
2. every source is taken from ``--mirror DIR`` when given, else fetched into
   ``<data_dir>/.dfbench_download/<name>/`` (kept until success, so a re-run never fetches twice;
   HTTP downloads continue a ``.part`` file with a Range request, Google Drive ones go through gdown);
3. ``build`` unpacks and post-processes them in a fresh staging folder beside the downloads;
4. the images the dataset loader finds are counted against the expected number (DomainBed's);
5. the staging folder is renamed into place, the marker is written last, the downloads are removed.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import shutil
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.error import HTTPError
from urllib.request import Request, urlopen

from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.paths import DEFAULT_DATA_DIR
from domainfusion_bench.registry import Registry

MARKER = ".dfbench_complete"  # written last into a finished dataset folder
WORK_DIR = ".dfbench_download"  # under the data dir: downloads and staging of unfinished datasets
GITHUB_RAW = "https://raw.githubusercontent.com/facebookresearch/DomainBed/main/domainbed/misc"
# LILA's Caltech Camera Traps: DomainBed's Azure link first, then LILA's Google Cloud copy
LILA_MIRRORS = (
    "https://lilablobssc.blob.core.windows.net/caltechcameratraps",
    "https://storage.googleapis.com/public-datasets-lila/caltechcameratraps",
)


@dataclass(frozen=True)
class Source:
    """One file to fetch. ``filename`` is its name in the download folder and in a ``--mirror`` folder."""

    filename: str
    urls: tuple[str, ...]  # tried in order; Google Drive links go through gdown
    sha256: str | None = None  # checked when known (None for the public sources: they publish none)


@dataclass(frozen=True)
class Recipe:
    name: str
    subdir: str  # the dataset's folder under the data dir
    expected_images: int  # what a complete download holds (DomainBed's numbers)
    sources: tuple[Source, ...]
    build: Callable[[dict[str, Path], Path], Path]  # (sources by file name, empty staging dir) -> dataset folder
    count: Callable[[Path], int] | None = None  # images in a built folder; default: what its loader finds


def gdrive(file_id: str) -> str:
    return f"https://drive.google.com/uc?id={file_id}"


# ---- fetching ---------------------------------------------------------------------------------


def http_download(url: str, dest: Path, timeout: float = 60.0, progress: bool = True) -> Path:
    """Fetch ``url`` to ``dest`` through ``dest.part``; an existing ``.part`` is continued (HTTP Range).

    A server that ignores the Range header gets the file again from the start. A transfer that ends
    early raises and keeps the ``.part`` for the next call.
    """
    from tqdm import tqdm

    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "dfbench"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as err:
        if err.code != 416 or not have:  # 416: nothing past our bytes, so the .part is not this file's start
            raise
        part.unlink()
        return http_download(url, dest, timeout, progress)
    with response:
        if have and response.status != 206:
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as f, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, disable=not progress
        ) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        raise OSError(f"transfer ended at {size} of {total} bytes (kept in {part}; a re-run continues it)")
    os.replace(part, dest)
    return dest


def fetch_url(url: str, dest: Path) -> None:
    """One URL to ``dest``: gdown for Google Drive (resumable), ``http_download`` otherwise."""
    if "drive.google.com" in url:
        import gdown

        try:
            gdown.download(url, str(dest), quiet=False, resume=True)
        except Exception as err:  # gdown's errors differ across versions: quota, removed file, cut transfer
            raise OSError(str(err).strip() or type(err).__name__) from None
        if not dest.is_file():
            raise OSError("gdown returned without a file")
    else:
        http_download(url, dest)


def sha256sum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def obtain(source: Source, work: Path, mirror: Path | None) -> Path:
    """The local path of ``source``: in the mirror, or downloaded (once) into ``work``."""
    if mirror is not None:
        path = mirror / source.filename
    else:
        path = work / source.filename
        if not path.is_file():
            work.mkdir(parents=True, exist_ok=True)
            errors = []
            for url in source.urls:
                try:
                    fetch_url(url, path)
                    break
                except (OSError, http.client.HTTPException, ValueError) as err:
                    errors.append(f"{url}: {err}")
            else:
                raise DfbenchError(
                    f"could not download {source.filename} ({'; '.join(errors)}). Re-running continues partial "
                    f"downloads kept in {work}. Without network access, put the files in a folder and pass "
                    f"--mirror DIR (see datasets/README.md)."
                )
    if source.sha256 is not None and (actual := sha256sum(path)) != source.sha256:
        raise DfbenchError(
            f"{path} has sha256 {actual}, expected {source.sha256}: the file is damaged or not the published one. "
            f"Delete {path} and re-run."
        )
    return path


# ---- post-processing --------------------------------------------------------------------------


def extract(archive: Path, into: Path) -> None:
    """Unpack a .zip, .tar or .tar.gz into ``into``; a damaged archive names the file to delete."""
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                z.extractall(into)
        else:
            with tarfile.open(archive) as t:
                t.extractall(into, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DfbenchError(f"cannot unpack {archive} ({err}): it is incomplete or damaged. Delete (or replace) it and re-run.") from None


def extracted_folder(folder: str) -> Callable[[dict[str, Path], Path], Path]:
    """Build step of the one-archive datasets: unpack, the dataset is the folder ``folder`` inside."""

    def build(files: dict[str, Path], staging: Path) -> Path:
        for path in files.values():
            extract(path, staging)
        return staging / folder

    return build


def build_domain_net(files: dict[str, Path], staging: Path) -> Path:
    """Unpack the six domains, then delete DomainBed's list of duplicate images."""
    root = staging / "domain_net"
    for filename, path in files.items():
        if filename.endswith(".zip"):
            extract(path, root)
    removed = 0
    for line in files["domain_net_duplicates.txt"].read_text().split():
        target = root / line
        if ".." not in Path(line).parts and target.is_file():
            target.unlink()
            removed += 1
    print(f"DomainNet: removed {removed} duplicate images")
    return root


TERRA_LOCATIONS = ("38", "46", "100", "43")
TERRA_CATEGORIES = ("bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel")


def build_terra_incognita(files: dict[str, Path], staging: Path) -> Path:
    """DomainBed's selection: images of 4 camera locations, one folder per annotated category (of 10).

    An image annotated with two kept categories goes into both folders, as in DomainBed.
    """
    extract(files["eccv_18_all_images_sm.tar.gz"], staging)
    extract(files["caltech_camera_traps.json.zip"], staging / "annotations")
    found = sorted((staging / "annotations").rglob("*.json"))
    if len(found) != 1:
        raise DfbenchError(f"caltech_camera_traps.json.zip should hold one .json file, found {len(found)}.")
    data = json.loads(found[0].read_text())
    images_dir = staging / "eccv_18_all_images_sm"
    categories = {c["id"]: c["name"] for c in data["categories"]}
    labels: dict[object, list[str]] = {}
    for a in data["annotations"]:
        labels.setdefault(a["image_id"], []).append(categories[a["category_id"]])
    root = staging / "terra_incognita"
    missing = 0
    for image in data["images"]:
        location = str(image["location"])
        if location not in TERRA_LOCATIONS:
            continue
        src = images_dir / image["file_name"]
        for category in labels.get(image["id"], []):
            if category not in TERRA_CATEGORIES:
                continue
            if not src.is_file():
                missing += 1
                continue
            dst = root / f"location_{location}" / category / Path(image["file_name"]).name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    if missing:
        print(f"TerraIncognita: {missing} annotated images are missing from the image archive")
    return root


def build_mnist(files: dict[str, Path], staging: Path) -> Path:
    """torchvision's MNIST(download=True) on the fetched files: it checks their MD5 and unpacks them."""
    from torchvision.datasets import MNIST
    from torchvision.datasets.utils import check_integrity

    raw = staging / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for filename, md5 in MNIST.resources:
        if not check_integrity(str(files[filename]), md5):
            raise DfbenchError(f"{files[filename]} is not the published MNIST file (MD5 differs). Delete it and re-run.")
        shutil.copyfile(files[filename], raw / filename)
    MNIST(str(staging), download=True)  # unpacks all four files
    return staging / "MNIST"


def count_mnist(folder: Path) -> int:
    from domainfusion_bench.data.mnist import load_mnist

    return len(load_mnist(folder.parent)[0])


def _mnist_sources() -> tuple[Source, ...]:
    from torchvision.datasets import MNIST

    return tuple(Source(name, tuple(m + name for m in MNIST.mirrors)) for name, _ in MNIST.resources)


# ---- the recipes ------------------------------------------------------------------------------

RECIPES: Registry[Recipe] = Registry("dataset to download")
DOMAIN_NET_ZIPS = {
    "clipart": "groundtruth/", "infograph": "", "painting": "groundtruth/", "quickdraw": "", "real": "", "sketch": "",
}

for _recipe in (
    Recipe("PACS", "PACS", 9_991, (Source("PACS.zip", (gdrive("1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd"),)),),
           extracted_folder("kfold")),
    Recipe("VLCS", "VLCS", 10_729, (Source("VLCS.tar.gz", (gdrive("1skwblH1_okBwxWxmRsp9_qi15hyPpxg8"),)),),
           extracted_folder("VLCS")),
    Recipe("OfficeHome", "office_home", 15_588,
           (Source("office_home.zip", (gdrive("1uY0pj7oFsjMxRwaD3Sxy0jgel0fsYXLC"),)),),
           extracted_folder("OfficeHomeDataset_10072016")),
    Recipe("TerraIncognita", "terra_incognita", 24_788, (
        Source("eccv_18_all_images_sm.tar.gz", tuple(f"{m}/eccv_18_all_images_sm.tar.gz" for m in LILA_MIRRORS)),
        Source("caltech_camera_traps.json.zip", tuple(f"{m}/labels/caltech_camera_traps.json.zip" for m in LILA_MIRRORS)),
    ), build_terra_incognita),
    Recipe("DomainNet", "domain_net", 586_575, tuple(
        Source(f"{d}.zip", (f"http://csr.bu.edu/ftp/visda/2019/multi-source/{sub}{d}.zip",))
        for d, sub in DOMAIN_NET_ZIPS.items()
    ) + (Source("domain_net_duplicates.txt", (f"{GITHUB_RAW}/domain_net_duplicates.txt",)),), build_domain_net),
    Recipe("MNIST", "MNIST", 70_000, _mnist_sources(), build_mnist, count_mnist),
):
    RECIPES.register(_recipe.name)(_recipe)


# ---- the command ------------------------------------------------------------------------------


def count_images(recipe: Recipe, folder: Path) -> int:
    """Images the dataset's own loader finds in ``folder`` (a wrong layout raises its DfbenchError)."""
    if recipe.count is not None:
        return recipe.count(folder)
    from domainfusion_bench.data import DATASETS

    return sum(DATASETS.get(recipe.name)(folder).sizes())


def verify(recipe: Recipe, folder: Path, expected: int, remedy: str) -> int:
    if not folder.is_dir():
        raise DfbenchError(f"{recipe.name}: the downloaded files did not produce {folder}. {remedy}")
    try:
        found = count_images(recipe, folder)
    except DfbenchError as err:
        raise DfbenchError(f"{recipe.name}: {folder} is not a usable {recipe.name} folder ({err}). {remedy}") from None
    if found != expected:
        raise DfbenchError(f"{recipe.name}: found {found:,} images in {folder}, expected {expected:,}. {remedy}")
    return found


def write_marker(folder: Path, name: str, images: int) -> None:
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"dataset": name, "images": images}) + "\n")
    os.replace(tmp, folder / MARKER)


def download(name: str, data_dir: str | Path | None = None, mirror: str | Path | None = None,
             expected_images: int | None = None, keep_downloads: bool = False) -> Path:
    """Put dataset ``name`` into ``data_dir`` in the layout its loader reads; returns its folder.

    ``mirror``: a folder holding the source files under their names (no network is used).
    ``expected_images``: the count to verify against (default: the real dataset's).
    ``keep_downloads``: keep the fetched files (a ready ``--mirror`` folder for other machines).
    """
    recipe = RECIPES.get(name)
    if data_dir is None:
        data_dir = DEFAULT_DATA_DIR
    data_dir = Path(data_dir)
    expected = recipe.expected_images if expected_images is None else expected_images
    final = data_dir / recipe.subdir
    if (final / MARKER).exists():
        print(f"{name}: already complete in {final}")
        return final
    if final.exists():  # from another tool (e.g. DomainBed's script) or copied in: keep it if it is complete
        images = verify(recipe, final, expected, f"Delete {final} and re-run `dfbench download {name}`.")
        write_marker(final, name, images)
        print(f"{name}: found complete in {final} ({images:,} images)")
        return final

    work = data_dir / WORK_DIR / name
    mirror = Path(mirror) if mirror is not None else None
    if mirror is not None and (missing := [s.filename for s in recipe.sources if not (mirror / s.filename).is_file()]):
        raise DfbenchError(f"the mirror {mirror} lacks {', '.join(missing)} (a {name} mirror holds "
                           f"{', '.join(s.filename for s in recipe.sources)}; see datasets/README.md).")
    files = {s.filename: obtain(s, work, mirror) for s in recipe.sources}
    staging = work / "staging"
    shutil.rmtree(staging, ignore_errors=True)  # an interrupted build starts over; downloads are kept
    staging.mkdir(parents=True)
    print(f"{name}: unpacking into {staging}")
    built = recipe.build(files, staging)
    remedy = (f"Check that the files in {mirror} are complete copies of the published ones" if mirror is not None
              else f"The downloads may be incomplete or changed upstream: delete {work}")
    images = verify(recipe, built, expected, f"{remedy}, and re-run `dfbench download {name}`.")
    os.replace(built, final)
    write_marker(final, name, images)
    if keep_downloads and mirror is None:
        shutil.rmtree(staging)
        print(f"{name}: downloads kept in {work} (usable as --mirror {work})")
    else:
        shutil.rmtree(work, ignore_errors=True)
        if not any((data_dir / WORK_DIR).iterdir()):
            (data_dir / WORK_DIR).rmdir()
    print(f"{name}: {images:,} images in {final}")
    return final
