"""Trial seeds 0..shared_trials-1 share one pixel DDPM trained on the intersection of their in-splits."""

import pytest
import torch
from torch.utils.data import TensorDataset

from domainfusion_bench.data.base import MultiDomainDataset
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.diffusion.trainer import InSplitImages, default_config, train_pixel_ddpm, training_indices
from domainfusion_bench.protocol import split_indices


class Toy(MultiDomainDataset):
    """4 RGB 16 px domains of 30 images, 3 classes."""

    input_shape = (3, 16, 16)
    num_classes = 3
    classes = ["a", "b", "c"]

    def __init__(self):
        self.domains = ["w", "x", "y", "z"]
        g = torch.Generator().manual_seed(0)
        self.envs = [TensorDataset(torch.rand(30, 3, 16, 16, generator=g), torch.arange(30) % 3) for _ in range(4)]


def config(**kw):
    return default_config(Toy(), steps=2, batch_size=4, block_out_channels=(8, 16), norm_num_groups=4, **kw)


def test_shared_training_indices_are_the_intersection_of_the_in_splits_and_avoid_every_out_split():
    for env in range(3):
        shared = training_indices(30, env, 1, 0.2, shared_trials=3)
        outs = [set(split_indices(30, s, env, 0.2)[0]) for s in range(3)]
        ins = [set(split_indices(30, s, env, 0.2)[1]) for s in range(3)]
        assert set(shared) == ins[0] & ins[1] & ins[2]
        assert not set(shared) & (outs[0] | outs[1] | outs[2])
        assert 0 < len(shared) < 24  # a strict subset of one in-split (24 of 30)
        # every shared trial seed gets the same images; a later seed and shared_trials=0 get their own in-split
        assert all(training_indices(30, env, s, 0.2, 3) == shared for s in range(3))
        assert set(training_indices(30, env, 3, 0.2, 3)) == set(split_indices(30, 3, env, 0.2)[1])
        assert set(training_indices(30, env, 1, 0.2, 0)) == ins[1]
    data = InSplitImages(Toy(), [0, 2], 2, 0.2, 16, shared_trials=3)
    assert data.index_record["w"] == training_indices(30, 0, 0, 0.2, 3)
    assert data.index_record["y"] == training_indices(30, 2, 0, 0.2, 3) and len(data) == sum(map(len, data.index_record.values()))


def test_trial_seeds_below_shared_trials_reuse_one_cached_ddpm(tmp_path):
    first = train_pixel_ddpm(Toy(), [0, 1, 2], [3], trial_seed=0, config=config(), cache_dir=tmp_path,
                             progress=False, made_by="trial-0")
    second = train_pixel_ddpm(Toy(), [0, 1, 2], [3], trial_seed=2, config=config(), cache_dir=tmp_path,
                              progress=False, made_by="trial-2")
    assert not first.reused and second.reused and second.key == first.key and second.path == first.path
    assert first.backbone.info["split"] == "shared:0-2"
    assert first.backbone.info["trained_on"]["w"]["n"] == len(training_indices(30, 0, 0, 0.2, 3))
    later = train_pixel_ddpm(Toy(), [0, 1, 2], [3], trial_seed=3, config=config(), cache_dir=tmp_path, progress=False)
    assert not later.reused and later.key != first.key and later.backbone.info["split"] == "trial:3"
    assert later.backbone.info["trained_on"]["w"]["n"] == 24
    own = [train_pixel_ddpm(Toy(), [0, 1, 2], [3], trial_seed=s, config=config(shared_trials=0), cache_dir=tmp_path,
                            progress=False).key for s in (0, 1)]
    assert own[0] != own[1] and first.key not in own
    with pytest.raises(DfbenchError, match="shared_trials"):
        config(shared_trials=-1)


def test_helper_models_are_shared_like_the_ddpm_and_scored_on_every_shared_out_split(tmp_path):
    from types import SimpleNamespace

    from domainfusion_bench.algorithms.validity import validity_judge
    from domainfusion_bench.diffusion.store import ModelStore
    from domainfusion_bench.diffusion.trainer import held_out_indices, shared_identity

    assert shared_identity(2) == (0, "shared:0-2") and shared_identity(3) == (3, "trial:3")
    store = ModelStore(tmp_path)
    hp = {"og_judge_width": 4, "og_judge_steps": 2, "og_judge_lr": 1e-3}

    def judge(trial):
        context = SimpleNamespace(dataset=Toy(), train_envs=[0, 1, 2], models=store, costs=None, device="cpu",
                                  made_by=f"trial-{trial}", heartbeat=lambda: None,
                                  args=SimpleNamespace(trial_seed=trial, holdout_fraction=0.2))
        return validity_judge(context, 16, hp)

    first, second, later = judge(0), judge(2), judge(3)
    assert not first.reused and second.reused and second.key == first.key and later.key != first.key
    assert first.info["n_train"] == sum(len(training_indices(30, e, 0, 0.2, 3)) for e in range(3))
    union = [set().union(*(split_indices(30, s, e, 0.2)[0] for s in range(3))) for e in range(3)]
    assert [set(held_out_indices(30, e, 1, 0.2, 3)) for e in range(3)] == union
    assert first.info["n_val"] == sum(map(len, union)) and later.info["n_val"] == 3 * 6


def test_a_run_that_finds_the_ddpm_in_training_trains_the_judge_meanwhile(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from domainfusion_bench.algorithms import ALGORITHMS, algorithm_space
    from domainfusion_bench.diffusion.store import ModelStore

    store = ModelStore(tmp_path)
    hp = {**algorithm_space("CDGA", Toy).defaults(), "og_judge_steps": 2, "og_judge_width": 4}
    algo = ALGORITHMS.get("CDGA")(Toy.input_shape, 3, 3, hp)
    context = SimpleNamespace(dataset=Toy(), train_envs=[0, 1, 2], test_envs=[3], models=store, costs=None,
                              device="cpu", made_by="run", heartbeat=lambda: None,
                              args=SimpleNamespace(trial_seed=0, holdout_fraction=0.2))
    judges = lambda: list((tmp_path / "validity_judge").glob("*/meta.json"))  # noqa: E731
    monkeypatch.setattr(store, "training_elsewhere", lambda kind: False)
    algo.while_the_ddpm_trains(context)
    assert not judges()  # nobody is training the DDPM: this run trains it first, as before
    monkeypatch.setattr(store, "training_elsewhere", lambda kind: kind == "pixel_ddpm")
    algo.while_the_ddpm_trains(context)
    assert len(judges()) == 1
    algo.hparams["og_measure"] = False
    monkeypatch.setattr(store, "path_of", lambda *a: pytest.fail("no judge without og_measure"))
    algo.while_the_ddpm_trains(context)
