"""The image store's batched RandomResizedCrop follows torchvision's rule on each image's original size."""

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop

from domainfusion_bench.data.augment import CROP_RATIO, CROP_SCALE, AugmentBatch, crop_params


@pytest.mark.parametrize("height,width", [(100, 100), (60, 200), (300, 50), (224, 160)])
def test_crop_parameters_match_torchvision_distribution(height, width):
    n = 4000
    torch.manual_seed(0)
    image = torch.zeros(1, height, width)
    ref = np.array([RandomResizedCrop.get_params(image, list(CROP_SCALE), list(CROP_RATIO)) for _ in range(n)])
    ours = crop_params(torch.full((n,), height), torch.full((n,), width), torch.Generator().manual_seed(1)).numpy()
    for k, name in enumerate("ijhw"):
        assert ours[:, k].min() >= 0
        assert ks_2samp(ours[:, k], ref[:, k]).pvalue > 1e-3, name
        assert abs(ours[:, k].mean() - ref[:, k].mean()) <= 0.03 * max(height, width), name
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    # the centre-crop fallback after 10 failed tries happens as often as in torchvision
    centre = lambda p: ((p[:, 0] == (height - p[:, 2]) // 2) & (p[:, 1] == (width - p[:, 3]) // 2)).mean()  # noqa: E731
    assert abs(centre(ours) - centre(ref)) < 0.03


def test_boxes_are_drawn_on_the_original_size_and_mapped_onto_the_stored_copy():
    stored = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    sizes = torch.tensor([[64, 256], [400, 100], [32, 32]])  # original (height, width) of stored rows 0..2
    aug = AugmentBatch(16)
    rows = torch.tensor([2, 0, 1])
    params = crop_params(sizes[rows, 0], sizes[rows, 1], torch.Generator().manual_seed(5))
    boxes = aug.boxes(stored, params, sizes[rows])
    for b, (i, j, h, w), (H, W) in zip(boxes, params, sizes[rows].tolist()):
        sx, sy = 32 / W, 32 / H
        assert torch.allclose(b[1:], torch.tensor([j * sx, i * sy, (j + w) * sx, (i + h) * sy]), atol=1e-4)
    # a very wide original: every box keeps torchvision's aspect limits in ORIGINAL pixels
    wide = crop_params(torch.full((500,), 64), torch.full((500,), 256), torch.Generator().manual_seed(0))
    aspect = wide[:, 3] / wide[:, 2]
    assert (aspect <= 4 / 3 + 0.05).all() and (aspect >= 3 / 4 - 0.05).all()
    out = aug(stored, torch.Generator().manual_seed(0), sizes[rows])
    assert out.shape == (3, 3, 16, 16)


def test_the_store_keeps_original_sizes_and_training_batches_crop_on_them(tmp_path, monkeypatch):
    from PIL import Image

    from domainfusion_bench.data import augment
    from domainfusion_bench.data.folder import FolderDataset
    from domainfusion_bench.data.loaders import SplitDataset, training_batches

    shapes = {"a": [(40, 90), (70, 30)], "b": [(50, 50), (20, 100)]}  # (height, width) per domain
    for domain, sizes in shapes.items():
        for k, (h, w) in enumerate(sizes):
            (tmp_path / "data" / domain / "cls").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (w, h), (k * 90, 10, 200)).save(tmp_path / "data" / domain / "cls" / f"{k}.png")
    ds = FolderDataset(tmp_path / "data")
    ds.set_resolution(16)
    ds.load_store(tmp_path / "cache")
    assert [env.original_sizes.tolist() for env in ds.envs] == [[list(s) for s in shapes[d]] for d in "ab"]
    seen = []
    real = augment.crop_params
    monkeypatch.setattr(augment, "crop_params", lambda h, w, g: seen.append(torch.stack([h, w], 1)) or real(h, w, g))
    splits = [SplitDataset(env, [0, 1], ds.train_transform(True), ds.batch_transform(True)) for env in ds.envs]
    batch = next(training_batches(splits, 2, seed=0))
    assert [x.shape for x, _ in batch] == [(2, 3, 16, 16)] * 2
    assert sorted(map(tuple, torch.cat(seen).long().tolist())) == sorted(shapes["a"] + shapes["b"])
