"""Mixed real + synthetic training splits: uint8 synthetic images, each item drawn equally often, the
fast tensor path kept, and the per-image (PIL) path of folder datasets."""

import torch
from PIL import Image
from torch.utils.data import TensorDataset

from domainfusion_bench.data.loaders import SplitDataset
from domainfusion_bench.data.pools import copies, mixed_split, synthetic_share


def test_copies_weight_every_item_equally_and_approach_the_fraction():
    for n_real, n_syn, fraction in [(100, 300, 0.5), (360, 720, 0.5), (7, 3, 0.25), (10, 1000, 0.9), (500, 13, 0.6)]:
        a, b = copies(n_real, n_syn, fraction)
        share = b * n_syn / (a * n_real + b * n_syn)
        assert a >= 1 and b >= 1 and abs(share - fraction) < 0.05, (n_real, n_syn, fraction, a, b)
    assert copies(10, 5, 0.0) == (1, 0) and copies(10, 5, 1.0) == (0, 1) and copies(10, 0, 0.5) == (1, 0)


def test_mixed_split_keeps_the_tensor_path_and_uint8_data():
    real = TensorDataset(torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8), torch.arange(20) % 4)
    split = SplitDataset(real, list(range(0, 20, 2)), None, batch_transform=lambda x, g: x.float())
    synthetic = torch.randint(0, 256, (30, 3, 16, 16), dtype=torch.uint8)
    mixed = mixed_split(split, synthetic, torch.arange(30) % 4, 0.5)
    x, y, rows = mixed.tensor_view()
    assert x.dtype == torch.uint8 and x.shape[1:] == (3, 8, 8)  # resized to the real images' size, still uint8
    counts = torch.bincount(rows, minlength=len(x))
    assert counts[:10].unique().numel() == 1 and counts[10:].unique().numel() == 1  # equal weight per item
    assert abs(synthetic_share(mixed) - 0.5) < 0.05
    assert torch.equal(x[:10], real.tensors[0][::2])


def test_float_real_data_gets_synthetic_images_in_unit_range():
    real = TensorDataset(torch.rand(12, 1, 8, 8), torch.zeros(12, dtype=torch.long))
    mixed = mixed_split(SplitDataset(real, range(12)), torch.full((4, 1, 8, 8), 255, dtype=torch.uint8),
                        torch.ones(4, dtype=torch.long), 0.25)
    x, y, _ = mixed.tensor_view()
    assert x.dtype == torch.float32 and torch.equal(x[12:], torch.ones(4, 1, 8, 8)) and y[12:].tolist() == [1] * 4


class _PILDomain(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return Image.new("RGB", (10, 10), (i * 40, 0, 0)), i % 2


def test_mixed_split_of_a_per_image_folder_split_applies_the_transform_to_synthetic_images():
    from torchvision import transforms as T

    split = SplitDataset(_PILDomain(), range(6), T.Compose([T.Resize((8, 8)), T.ToTensor()]))
    synthetic = torch.full((3, 3, 16, 16), 255, dtype=torch.uint8)
    mixed = mixed_split(split, synthetic, torch.tensor([1, 0, 1]), 0.5)
    items = [mixed[k] for k in range(len(mixed))]
    assert all(x.shape == (3, 8, 8) and x.dtype == torch.float32 for x, _ in items)
    white = [x for x, _ in items if torch.allclose(x, torch.ones(3, 8, 8))]
    assert len(white) == len(items) // 2  # the synthetic half, through the same transform as real images
