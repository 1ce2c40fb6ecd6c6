"""RotatedMNIST and ColoredMNIST on tiny fake MNIST files in torchvision's raw format."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

from domainfusion_bench.data import get_dataset
from domainfusion_bench.data.mnist import ColoredMNIST, RotatedMNIST, load_mnist
from domainfusion_bench.errors import DfbenchError

N_TRAIN, N_TEST = 500, 100


def fake_mnist(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` distinct 28x28 uint8 images with a bright centre block (never blank), labels 0-9."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[:, 6:22, 6:22] = torch.randint(1, 256, (n, 16, 16), generator=g, dtype=torch.uint8)
    return images, torch.arange(n) % 10


def idx_bytes(tensor: torch.Tensor) -> bytes:
    """IDX encoding (big-endian magic and sizes, then uint8 data), as torchvision reads it."""
    magic = 0x0800 | tensor.dim()  # 0x08: unsigned byte
    return struct.pack(f">I{tensor.dim()}I", magic, *tensor.shape) + tensor.numpy().tobytes()


def write_fake_mnist(folder: Path, gzipped: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The four MNIST files in ``folder`` (``.gz`` when ``gzipped``, as published); returns all images, labels."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = {"train": fake_mnist(N_TRAIN, seed=1), "t10k": fake_mnist(N_TEST, seed=2)}
    for prefix, (images, labels) in parts.items():
        for kind, tensor in (("images-idx3", images), ("labels-idx1", labels.to(torch.uint8))):
            name, data = f"{prefix}-{kind}-ubyte", idx_bytes(tensor)
            if gzipped:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return torch.cat([parts["train"][0], parts["t10k"][0]]), torch.cat([parts["train"][1], parts["t10k"][1]])


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fake_mnist(root / "MNIST" / "raw")
    return root


def test_fake_files_read_by_torchvision(mnist_dir):
    images, labels = load_mnist(mnist_dir)
    expected_images, expected_labels = write_fake_mnist(mnist_dir / "check" / "MNIST" / "raw")
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


def test_rotated_mnist(mnist_dir):
    ds = get_dataset("RotatedMNIST", mnist_dir)
    assert isinstance(ds, RotatedMNIST)
    assert ds.domains == ["0", "15", "30", "45", "60", "75"] and ds.num_classes == 10
    assert ds.sizes() == [100] * 6
    x, y = ds[3][0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert ds.input_shape == (1, 28, 28) and y.dtype == torch.long and 0 <= int(y) < 10

    # The 0-degree environment holds original images with their own labels; the environments are disjoint.
    images, labels = load_mnist(mnist_dir)
    label_of = {img.numpy().tobytes(): int(lab) for img, lab in zip(images, labels)}
    x0, y0 = ds[0].tensors
    originals = (x0.squeeze(1) * 255).round().to(torch.uint8)
    assert [label_of[img.numpy().tobytes()] for img in originals] == y0.tolist()
    # Rotated environments differ from any unrotated image, and are rotated copies (the centre block moves).
    x15 = ds[1].tensors[0].squeeze(1)
    assert not any(img.numpy().tobytes() in label_of for img in (x15 * 255).round().to(torch.uint8))
    assert (x15[:, 6:22, 6:22] == 0).any()  # rotation brought black corners into the block


def test_environments_depend_only_on_the_dataset_seed(mnist_dir):
    for cls in (RotatedMNIST, ColoredMNIST):
        torch.manual_seed(1)
        a = cls(mnist_dir)
        torch.manual_seed(12345)
        torch.rand(7)
        b = cls(mnist_dir)
        for env_a, env_b in zip(a.envs, b.envs):
            assert all(torch.equal(ta, tb) for ta, tb in zip(env_a.tensors, env_b.tensors))


def test_colored_mnist(mnist_dir):
    ds = get_dataset("ColoredMNIST", mnist_dir)
    assert isinstance(ds, ColoredMNIST) and ds.num_classes == 2 and len(ds) == 3
    assert ds.sizes() == [200, 200, 200]
    for env, agreement in zip(ds.envs, (0.9, 0.8, 0.1)):
        x, y = env.tensors
        assert x.shape[1:] == (2, 14, 14) and set(y.unique().tolist()) <= {0, 1}
        on = x.flatten(2).sum(-1) > 0  # [N, 2]: which channel carries the digit
        assert (on.sum(1) == 1).all()  # exactly one colour per image
        colour = on[:, 1].long()
        assert abs((colour == y).float().mean().item() - agreement) < 0.08


def test_missing_mnist_names_the_download_command(tmp_path):
    for name in ("RotatedMNIST", "ColoredMNIST"):
        with pytest.raises(DfbenchError, match=r"MNIST not found .*dfbench download MNIST --data_dir"):
            get_dataset(name, tmp_path)
