"""``dfbench download`` offline: fixture archives laid out like the real ones, in a mirror or on a local
HTTP server; counts overridden for the fixtures."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from domainfusion_bench.cli import main
from domainfusion_bench.data import get_dataset
from domainfusion_bench.data import download as dl
from domainfusion_bench.data.download import MARKER, RECIPES, WORK_DIR, Source, download, http_download
from domainfusion_bench.data.folder import PACS, DomainNet, OfficeHome, VLCS
from domainfusion_bench.errors import DfbenchError
from test_folder_datasets import make_image_folder, write_image
from test_mnist_datasets import N_TEST, N_TRAIN, write_fake_mnist


def zip_tree(src: Path, archive: Path) -> Path:
    """Every file under ``src`` into a zip, named relative to ``src`` (as the published archives)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(src).as_posix())
    return archive


def tar_tree(src: Path, archive: Path) -> Path:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as t:
        for path in sorted(src.iterdir()):
            t.add(path, arcname=path.name)
    return archive


def with_recipe(monkeypatch, name: str, **changes) -> None:
    """Swap a field of a registered recipe for this test (restored afterwards)."""
    monkeypatch.setitem(RECIPES._entries, name, dataclasses.replace(RECIPES.get(name), **changes))


def no_network(monkeypatch) -> None:
    def refuse(url, dest):
        raise AssertionError(f"the test must not fetch {url}")

    monkeypatch.setattr(dl, "fetch_url", refuse)


# ---- fixture archives ---------------------------------------------------------------------------

SINGLE_ARCHIVE = {  # name: (dataset class, archive name, the folder inside the archive)
    "PACS": (PACS, "PACS.zip", "kfold"),
    "VLCS": (VLCS, "VLCS.tar.gz", "VLCS"),
    "OfficeHome": (OfficeHome, "office_home.zip", "OfficeHomeDataset_10072016"),
}


def single_archive_mirror(tmp_path: Path, name: str) -> tuple[Path, int]:
    """A mirror holding ``name``'s one archive, 2 classes x 2 images per domain; returns (mirror, images)."""
    cls, archive, top = SINGLE_ARCHIVE[name]
    src = tmp_path / "src" / name
    n = make_image_folder(src / top, cls.DOMAINS, ["chair", "dog"], per_class=2)
    (src / top / "ImageInfo.csv").write_text("extra files beside the domains are fine\n")
    mirror = tmp_path / "mirror"
    (zip_tree if archive.endswith(".zip") else tar_tree)(src, mirror / archive)
    return mirror, n


@pytest.fixture
def pacs_mirror(tmp_path):
    return single_archive_mirror(tmp_path, "PACS")


DUPLICATES = ["clipart/bird/bird_0.jpg", "real/cat/cat_1.jpg", "sketch/bird/bird_1.jpg"]


def domain_net_mirror(tmp_path: Path) -> tuple[Path, int]:
    mirror = tmp_path / "mirror"
    n = 0
    for domain in DomainNet.DOMAINS:
        src = tmp_path / "src" / domain
        n += make_image_folder(src, [domain], ["bird", "cat"], per_class=2)
        zip_tree(src, mirror / f"{domain}.zip")
    # DomainBed's list: paths under domain_net/; a line for a file that is not there is skipped.
    (mirror / "domain_net_duplicates.txt").write_text("\n".join(DUPLICATES + ["real/cat/not_there.jpg"]) + "\n")
    return mirror, n - len(DUPLICATES)


def terra_incognita_mirror(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """CCT-like images tarball + annotation JSON zip; returns (mirror, expected images per location folder)."""
    categories = [{"id": 1, "name": "bird"}, {"id": 2, "name": "empty"}, {"id": 30, "name": "car"}]
    images, annotations = [], []

    def add(location, *category_ids):
        k = len(images)
        images.append({"id": f"img{k}", "file_name": f"{k:04d}-cct.jpg", "location": location})
        for c in category_ids:
            annotations.append({"id": f"ann{len(annotations)}", "image_id": f"img{k}", "category_id": c})

    for location in ("38", "46", 100, "43"):  # the JSON has used both strings and ints for locations
        add(location, 1)
        add(location, 2)
    add("38", 30)  # a category DomainBed leaves out
    add("38", 1, 2)  # two kept categories: a copy in each folder, as DomainBed
    add("7", 1)  # a location DomainBed leaves out
    src = tmp_path / "src"
    for image in images:
        write_image(src / "images" / "eccv_18_all_images_sm" / image["file_name"], seed=len(image["file_name"]))
    meta = {"info": {}, "categories": categories, "images": images, "annotations": annotations}
    (src / "json").mkdir(parents=True)
    (src / "json" / "caltech_images_20210113.json").write_text(json.dumps(meta))
    mirror = tmp_path / "mirror"
    tar_tree(src / "images", mirror / "eccv_18_all_images_sm.tar.gz")
    zip_tree(src / "json", mirror / "caltech_camera_traps.json.zip")
    return mirror, {"location_100": 2, "location_38": 4, "location_43": 2, "location_46": 2}


# ---- downloads from a mirror --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SINGLE_ARCHIVE))
def test_single_archive_datasets_from_mirror(tmp_path, monkeypatch, name):
    no_network(monkeypatch)
    mirror, n = single_archive_mirror(tmp_path, name)
    data = tmp_path / "data"
    folder = download(name, data, mirror=mirror, expected_images=n)
    cls = SINGLE_ARCHIVE[name][0]
    assert folder == data / cls.SUBDIR and (folder / MARKER).is_file()
    ds = get_dataset(name, data)
    assert ds.domains == sorted(cls.DOMAINS) and ds.classes == ["chair", "dog"]
    assert ds.sizes() == [4] * len(cls.DOMAINS)
    assert not (data / WORK_DIR).exists()  # staging removed after success


def test_completed_dataset_is_skipped(tmp_path, pacs_mirror, monkeypatch, capsys):
    no_network(monkeypatch)
    mirror, n = pacs_mirror
    data = tmp_path / "data"
    download("PACS", data, mirror=mirror, expected_images=n)
    for archive in mirror.iterdir():
        archive.unlink()  # a second call must not need the sources at all
    assert download("PACS", data, mirror=mirror, expected_images=n) == data / "PACS"
    assert "already complete" in capsys.readouterr().out


def test_domain_net_removes_duplicates(tmp_path, monkeypatch):
    no_network(monkeypatch)
    mirror, n = domain_net_mirror(tmp_path)
    data = tmp_path / "data"
    folder = download("DomainNet", data, mirror=mirror, expected_images=n)
    for duplicate in DUPLICATES:
        assert not (folder / duplicate).exists()
    assert (folder / "clipart" / "bird" / "bird_1.jpg").is_file()
    ds = get_dataset("DomainNet", data)
    assert ds.domains == list(DomainNet.DOMAINS) and ds.classes == ["bird", "cat"]
    assert ds.sizes() == [3, 4, 4, 4, 3, 3] and sum(ds.sizes()) == n


def test_terra_incognita_selection(tmp_path, monkeypatch):
    no_network(monkeypatch)
    mirror, per_location = terra_incognita_mirror(tmp_path)
    data = tmp_path / "data"
    folder = download("TerraIncognita", data, mirror=mirror, expected_images=sum(per_location.values()))
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == sorted(per_location)
    ds = get_dataset("TerraIncognita", data)
    assert ds.classes == ["bird", "empty"]
    assert dict(zip(ds.domains, ds.sizes())) == per_location
    assert (folder / "location_38" / "bird" / "0009-cct.jpg").is_file()  # both categories of image 9
    assert (folder / "location_38" / "empty" / "0009-cct.jpg").is_file()
    assert not list(folder.rglob("0008-cct.jpg")) and not list(folder.rglob("0010-cct.jpg"))  # car; location 7


def test_mnist_from_mirror(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    no_network(monkeypatch)
    mirror = tmp_path / "mirror"
    write_fake_mnist(mirror, gzipped=True)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in mirror.iterdir()}
    data = tmp_path / "data"
    with pytest.raises(DfbenchError, match="not the published MNIST file.*Delete it and re-run"):
        download("MNIST", data, mirror=mirror, expected_images=N_TRAIN + N_TEST)  # the real MD5s differ
    monkeypatch.setattr(MNIST, "resources", [(name, md5[name]) for name, _ in MNIST.resources])
    assert download("MNIST", data, mirror=mirror, expected_images=N_TRAIN + N_TEST) == data / "MNIST"
    assert sum(get_dataset("RotatedMNIST", data).sizes()) == N_TRAIN + N_TEST


# ---- verification and errors --------------------------------------------------------------------


def test_wrong_count_fails_clearly_then_a_rerun_succeeds(tmp_path, pacs_mirror, monkeypatch):
    no_network(monkeypatch)
    mirror, n = pacs_mirror
    data = tmp_path / "data"
    with pytest.raises(DfbenchError, match=rf"PACS: found {n} images in .*expected {n + 1}\. Check that the files "
                                           rf"in {mirror} are complete.*re-run `dfbench download PACS`"):
        download("PACS", data, mirror=mirror, expected_images=n + 1)
    assert not (data / "PACS").exists()  # nothing half-made where the loader looks
    download("PACS", data, mirror=mirror, expected_images=n)
    assert get_dataset("PACS", data).sizes() == [4, 4, 4, 4]


def test_real_counts_are_the_default(tmp_path, pacs_mirror, monkeypatch):
    no_network(monkeypatch)
    with pytest.raises(DfbenchError, match="expected 9,991"):
        download("PACS", tmp_path / "data", mirror=pacs_mirror[0])
    expected = {name: RECIPES.get(name).expected_images for name in RECIPES}
    assert expected == {"PACS": 9_991, "VLCS": 10_729, "OfficeHome": 15_588, "TerraIncognita": 24_788,
                        "DomainNet": 586_575, "MNIST": 70_000}


def test_existing_folder_is_adopted_only_when_complete(tmp_path, monkeypatch):
    """A folder made by DomainBed's own script (no marker) is kept if its count is right."""
    no_network(monkeypatch)
    data = tmp_path / "data"
    n = make_image_folder(data / "PACS", PACS.DOMAINS, ["dog"], per_class=1)
    with pytest.raises(DfbenchError, match=rf"found {n} images .*expected 99\. Delete {data / 'PACS'} and re-run"):
        download("PACS", data, expected_images=99)
    download("PACS", data, expected_images=n)
    assert (data / "PACS" / MARKER).is_file()


def test_damaged_archive_names_the_file(tmp_path, pacs_mirror, monkeypatch):
    no_network(monkeypatch)
    mirror, n = pacs_mirror
    archive = mirror / "PACS.zip"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DfbenchError, match=rf"cannot unpack {archive} .*Delete \(or replace\) it and re-run"):
        download("PACS", tmp_path / "data", mirror=mirror, expected_images=n)


def test_mirror_without_the_file(tmp_path, monkeypatch):
    no_network(monkeypatch)
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "real.zip").write_bytes(b"")
    with pytest.raises(DfbenchError, match=r"the mirror .* lacks clipart.zip, infograph.zip, painting.zip, "
                                           r"quickdraw.zip, sketch.zip, domain_net_duplicates.txt \(a DomainNet "
                                           r"mirror holds clipart.zip, .*, domain_net_duplicates.txt"):
        download("DomainNet", tmp_path / "data", mirror=tmp_path / "mirror")


def test_unknown_name_lists_the_choices(tmp_path):
    with pytest.raises(DfbenchError, match="Did you mean 'PACS'.*Choices: PACS, VLCS, OfficeHome, TerraIncognita, "
                                           "DomainNet, MNIST"):
        download("PAC", tmp_path)


def test_sha256_is_checked_when_known(tmp_path, pacs_mirror, monkeypatch):
    no_network(monkeypatch)
    mirror, n = pacs_mirror
    good = hashlib.sha256((mirror / "PACS.zip").read_bytes()).hexdigest()
    with_recipe(monkeypatch, "PACS", sources=(Source("PACS.zip", ("unused",), sha256="0" * 64),))
    with pytest.raises(DfbenchError, match=f"has sha256 {good}, expected 0000.*Delete .*PACS.zip and re-run"):
        download("PACS", tmp_path / "data", mirror=mirror, expected_images=n)
    with_recipe(monkeypatch, "PACS", sources=(Source("PACS.zip", ("unused",), sha256=good),))
    download("PACS", tmp_path / "data", mirror=mirror, expected_images=n)


# ---- network: resumable HTTP on 127.0.0.1 ---------------------------------------------------------


class FileServer:
    """Serves ``files`` on 127.0.0.1 with HTTP Range support; can ignore Range or cut a transfer short."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.ranges, self.honour_range, self.cut_after = files, [], True, None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = server.files.get(self.path.lstrip("/"))
                if body is None:
                    return self.send_error(404)
                asked = self.headers.get("Range")
                server.ranges.append(asked)
                start = int(asked.split("=")[1].rstrip("-")) if asked and server.honour_range else 0
                if start >= len(body) and start:
                    return self.send_error(416)
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                cut = len(body) if server.cut_after is None else server.cut_after
                self.wfile.write(body[start:cut])  # HTTP/1.0: the connection closes after this

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    payload = bytes(range(256)) * 1200  # 307,200 bytes
    s = FileServer({"file.bin": payload})
    s.payload = payload
    yield s
    s.close()


def test_truncated_part_file_resumes_with_a_range_request(tmp_path, server):
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(server.payload[:100_000])
    http_download(f"{server.url}/file.bin", dest, progress=False)
    assert dest.read_bytes() == server.payload
    assert server.ranges == ["bytes=100000-"] and not (tmp_path / "file.bin.part").exists()


def test_cut_transfer_keeps_the_part_and_the_next_call_finishes(tmp_path, server):
    dest = tmp_path / "file.bin"
    server.cut_after = 150_000
    with pytest.raises(OSError, match="transfer ended at 150000 of 307200 bytes"):
        http_download(f"{server.url}/file.bin", dest, progress=False)
    assert (tmp_path / "file.bin.part").stat().st_size == 150_000 and not dest.exists()
    server.cut_after = None
    http_download(f"{server.url}/file.bin", dest, progress=False)
    assert dest.read_bytes() == server.payload and server.ranges == [None, "bytes=150000-"]


def test_server_ignoring_range_restarts_cleanly(tmp_path, server):
    server.honour_range = False
    (tmp_path / "file.bin.part").write_bytes(b"x" * 1000)
    http_download(f"{server.url}/file.bin", tmp_path / "file.bin", progress=False)
    assert (tmp_path / "file.bin").read_bytes() == server.payload


def test_part_longer_than_the_file_restarts(tmp_path, server):
    (tmp_path / "file.bin.part").write_bytes(server.payload + b"stale")
    http_download(f"{server.url}/file.bin", tmp_path / "file.bin", progress=False)
    assert (tmp_path / "file.bin").read_bytes() == server.payload


def test_interrupted_dataset_download_resumes(tmp_path, pacs_mirror, monkeypatch):
    """Over HTTP: a cut transfer fails with a clear error, keeps its bytes, and the re-run completes."""
    mirror, n = pacs_mirror
    served = FileServer({"PACS.zip": (mirror / "PACS.zip").read_bytes()})
    try:
        with_recipe(monkeypatch, "PACS", expected_images=n, sources=(Source("PACS.zip", (f"{served.url}/PACS.zip",)),))
        data = tmp_path / "data"
        served.cut_after = 1000
        with pytest.raises(DfbenchError, match="could not download PACS.zip .*partial downloads kept in .*--mirror"):
            download("PACS", data)
        assert (data / WORK_DIR / "PACS" / "PACS.zip.part").stat().st_size == 1000
        served.cut_after = None
        download("PACS", data)
        assert served.ranges == [None, "bytes=1000-"]
        assert get_dataset("PACS", data).sizes() == [4, 4, 4, 4]
        assert not (data / WORK_DIR).exists()
    finally:
        served.close()


def test_kept_downloads_are_a_mirror(tmp_path, pacs_mirror, monkeypatch):
    mirror, n = pacs_mirror
    served = FileServer({"PACS.zip": (mirror / "PACS.zip").read_bytes()})
    try:
        with_recipe(monkeypatch, "PACS", expected_images=n, sources=(Source("PACS.zip", (f"{served.url}/PACS.zip",)),))
        download("PACS", tmp_path / "online", keep_downloads=True)
    finally:
        served.close()
    kept = tmp_path / "online" / WORK_DIR / "PACS"
    assert sorted(p.name for p in kept.iterdir()) == ["PACS.zip"]  # the staging folder is gone
    no_network(monkeypatch)
    download("PACS", tmp_path / "offline", mirror=kept)
    assert get_dataset("PACS", tmp_path / "offline").sizes() == [4, 4, 4, 4]


def test_network_failure_suggests_a_mirror(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with_recipe(monkeypatch, "PACS", sources=(Source("PACS.zip", (f"http://127.0.0.1:{port}/PACS.zip",)),))
    with pytest.raises(DfbenchError, match=r"could not download PACS.zip \(http://127.0.0.1.*--mirror DIR"):
        download("PACS", tmp_path / "data")


# ---- the command line ---------------------------------------------------------------------------


def test_cli_download_from_mirror(tmp_path, pacs_mirror, monkeypatch, capsys):
    no_network(monkeypatch)
    mirror, n = pacs_mirror
    with_recipe(monkeypatch, "PACS", expected_images=n)
    data = tmp_path / "data"
    main(["download", "PACS", "--data_dir", str(data), "--mirror", str(mirror)])
    assert f"PACS: {n} images in {data / 'PACS'}" in capsys.readouterr().out
    assert get_dataset("PACS", data).sizes() == [4, 4, 4, 4]
    main(["download", "PACS", "--data_dir", str(data), "--mirror", str(mirror)])
    assert "already complete" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    no_network(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main(["download", "PACS", "Domainnet", "--data_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "unknown dataset to download 'Domainnet'. Did you mean 'DomainNet'?" in capsys.readouterr().err
    assert not (tmp_path / WORK_DIR).exists()  # names are checked before PACS starts
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main(["download", "VLCS", "--data_dir", str(tmp_path), "--mirror", str(tmp_path / "empty")])
    assert "dfbench download: error: the mirror" in capsys.readouterr().err.splitlines()[0]
