"""The image store's batched augmentation: DomainBed's distribution, crops from the original images,
one draw per image of the global batch whatever the number of processes."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from domainfusion_bench.data.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentBatch, crop_source_size
from domainfusion_bench.data.folder import FolderDataset
from domainfusion_bench.data.loaders import SplitDataset, training_batches

R = 48  # training resolution of the fixture (DomainBed: 224); the rules scale with it


@pytest.fixture
def store(tmp_path):
    """Two domains of fine-detailed 100 x 100 images (pixel noise on stripes), in the store at R px."""
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[:100, :100]
    for domain in "ab":
        for k in range(2):
            base = np.stack([128 + 100 * np.sin(xx / (1.5 + k)), 128 + 100 * np.cos(yy / 2.0),
                             60 + 40 * ((xx // 3 + yy // 3) % 2)], -1)
            img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            (tmp_path / "data" / domain / "c").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(tmp_path / "data" / domain / "c" / f"{k}.png")
    ds = FolderDataset(tmp_path / "data")
    ds.set_resolution(R)
    ds.load_store(tmp_path / "cache")
    return ds


def _stats(x):
    """Per image: mean, std, detail (mean absolute neighbour difference), grayscale."""
    detail = (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3)) + (x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3))
    gray = ((x[:, 0] - x[:, 1]).abs().amax((1, 2)) < 1e-6).float()
    return {"mean": x.mean((1, 2, 3)).mean(), "std": x.std((1, 2, 3)).mean(), "detail": detail.mean(),
            "gray": gray.mean()}


def test_store_crops_have_the_distribution_of_domainbeds_pil_pipeline(store):
    assert store.crop_size == 100  # the originals fit: the crop copy is the original images
    domainbed = T.Compose([T.RandomResizedCrop(R, scale=(0.7, 1.0)), T.RandomHorizontalFlip(),
                           T.ColorJitter(0.3, 0.3, 0.3, 0.3), T.RandomGrayscale(), T.ToTensor()])
    unnormalize = lambda x: x * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]  # noqa: E731
    n, aug, ref, ours, squashed = 500, AugmentBatch(R), [], [], []
    torch.manual_seed(0)
    for d, (env, crop_env) in enumerate(zip(store.envs, store.crop_envs)):
        for k in range(len(env)):
            image = T.functional.to_pil_image(crop_env.tensors[0][k])
            ref.append(torch.stack([domainbed(image) for _ in range(n)]))
            sizes = crop_env.original_sizes[[k] * n]
            ours.append(unnormalize(aug(crop_env.tensors[0][[k] * n], torch.Generator().manual_seed(d * 10 + k), sizes)))
            squashed.append(unnormalize(aug(env.tensors[0][[k] * n], torch.Generator().manual_seed(k), sizes)))
    a, b, old = _stats(torch.cat(ref)), _stats(torch.cat(ours)), _stats(torch.cat(squashed))
    assert abs(b["mean"] - a["mean"]) < 0.01
    assert abs(b["std"] / a["std"] - 1) < 0.03 and abs(b["detail"] / a["detail"] - 1) < 0.03
    assert abs(b["gray"] - 0.1) < 0.03 and abs(a["gray"] - 0.1) < 0.03
    # cropping the squashed R px copy (the old store) loses fine detail: the statistics see it
    assert old["detail"] / a["detail"] - 1 < -0.08


def test_the_crop_copy_is_the_original_up_to_2x_resolution_over_the_crop_scale():
    assert crop_source_size(224, 227) == 227 and crop_source_size(224, 2048) == 640 and crop_source_size(48, 60) == 60


def test_every_image_draws_its_own_jitter_order():
    p = AugmentBatch(R).draw(torch.full((64, 2), 100), torch.Generator().manual_seed(0))
    assert (p["order"].sort(1).values == torch.arange(4)).all()  # a permutation per image
    assert len({tuple(o) for o in p["order"].tolist()}) > 10  # not one order for the batch


@pytest.mark.parametrize("batch_size", [7, 8])
def test_ranks_get_the_draws_of_their_slice_of_the_one_process_batch(store, batch_size):
    splits = [SplitDataset(env, [0, 1], None, store.batch_transform(True)) for env in store.crop_envs]
    alone = next(training_batches(splits, batch_size, seed=4, start_step=3))
    ranks = [next(training_batches(splits, batch_size, seed=4, start_step=3, rank=r, world=2)) for r in (0, 1)]
    for d, (x, y) in enumerate(alone):
        for r in (0, 1):
            assert torch.equal(ranks[r][d][0], x[r::2]) and torch.equal(ranks[r][d][1], y[r::2])


def test_which_path_ran_is_recorded_and_only_the_flag_rekeys_a_run(store, tmp_path):
    import dataclasses

    from domainfusion_bench.cli import build_parser
    from domainfusion_bench.protocol import run_hash
    from domainfusion_bench.training import Speed, TrainArgs
    from domainfusion_bench.training.data_setup import load_data

    args = TrainArgs(dataset=f"folder:{tmp_path / 'data'}", data_dir=str(tmp_path))
    fresh = lambda: FolderDataset(tmp_path / "data")  # noqa: E731
    fresh_ds = fresh()
    fresh_ds.set_resolution(R)
    assert load_data(args, Speed(), fresh_ds).store_protocol == {"used": True, "crop_copy_px": 100, "resolution": R,
                                                                 "crop_copy_is_original": True}
    too_small = load_data(args, Speed(store_max_gb=1e-6), fresh()).store_protocol
    assert too_small["used"] is False and "DFBENCH_STORE_GB" in too_small["why"]
    off = dataclasses.replace(args, no_image_store=True)
    assert load_data(off, Speed(), fresh()).store_protocol == {"used": False, "why": "--no_image_store"}
    assert build_parser().parse_args(["train", "--no_image_store"]).no_image_store is True
    base = dataclasses.asdict(args)
    old = {k: v for k, v in base.items() if k != "no_image_store"}  # a run hashed before the flag existed
    assert run_hash(base) == run_hash(old) and run_hash(dataclasses.asdict(off)) != run_hash(base)


def test_training_splits_crop_from_the_crop_copy_and_evaluation_reads_the_resized_one(store):
    from domainfusion_bench.training import TrainArgs, make_splits

    args = TrainArgs(dataset="folder:x", test_envs=[0])
    train, splits, _ = make_splits(store, args, {"data_augmentation": True})
    assert train[0].dataset is store.crop_envs[1] and splits["env1_out"].dataset is store.envs[1]
    _, augmented, _ = make_splits(store, args, {"data_augmentation": True}, eval_augment=True)
    assert augmented["env1_out"].dataset is store.crop_envs[1] and augmented["env0_in"].dataset is store.envs[0]
    unaugmented, _, _ = make_splits(store, args, {"data_augmentation": False})
    assert unaugmented[0].dataset is store.envs[1]  # no crops: the resized copy, as DomainBed's eval transform


def test_eval_augment_crops_on_original_sizes_with_the_callers_key(store, monkeypatch):
    from domainfusion_bench.data import augment
    from domainfusion_bench.data.loaders import eval_batches

    seen, real = [], augment.crop_params
    monkeypatch.setattr(augment, "crop_params", lambda h, w, g: seen.append(torch.stack([h, w], 1)) or real(h, w, g))
    split = SplitDataset(store.envs[0], [0, 1], None, store.batch_transform(True))
    a = torch.cat([x for x, _ in eval_batches(split, 2, key=(0, 10, "env0_out"))])
    assert torch.cat(seen).tolist() == [[100, 100], [100, 100]]  # the originals' sizes, not the stored 48 px
    b = torch.cat([x for x, _ in eval_batches(split, 2, key=(0, 20, "env0_out"))])
    assert not torch.equal(a, b)  # another checkpoint, other draws (no fixed seed)
