"""The DomainBed-compatible protocol facts, pinned to literal values."""

import hashlib

import numpy as np
import pytest

from domainfusion_bench.algorithms import algorithm_space
from domainfusion_bench.data import dataset_class
from domainfusion_bench.protocol import run_hash, seed_hash, split_indices


def test_seed_hash_pinned_values():
    assert seed_hash(0, 0) == 894182419
    assert seed_hash(1, 0) == 785910682
    assert seed_hash(0, 1) == 1514274641
    assert seed_hash(3, "lr") == 1414497592
    # the definition: md5 of the tuple's text, mod 2**31
    assert seed_hash(7, "x") == int(hashlib.md5(b"(7, 'x')").hexdigest(), 16) % 2**31


def test_split_is_domainbed_rule():
    out_idx, in_idx = split_indices(10, trial_seed=0, domain=0)
    assert out_idx == [2, 3] and in_idx == [8, 1, 4, 5, 0, 9, 6, 7]
    out_idx, in_idx = split_indices(10, trial_seed=1, domain=2)
    assert out_idx == [1, 0]
    # the rule itself: a seeded shuffle, the first int(n * holdout) are the out split
    keys = list(range(101))
    np.random.RandomState(seed_hash(4, 3)).shuffle(keys)
    assert split_indices(101, 4, 3, 0.3) == (keys[:30], keys[30:])


def test_splits_partition_each_domain():
    out_idx, in_idx = split_indices(57, 2, 1)
    assert sorted(out_idx + in_idx) == list(range(57)) and len(out_idx) == int(57 * 0.2)


def _domainbed_draw(hparams_seed, trial_seed, name, sampler):
    """DomainBed's recipe written out: per-name RandomState of seed_hash(seed_hash(h, t), name)."""
    return sampler(np.random.RandomState(seed_hash(seed_hash(hparams_seed, trial_seed), name)))


@pytest.mark.parametrize("dataset", ["PACS", "DomainNet", "RotatedMNIST", "RotatedDigits"])
@pytest.mark.parametrize("hparams_seed,trial_seed", [(1, 0), (2, 1), (17, 2)])
def test_erm_draws_equal_domainbed(dataset, hparams_seed, trial_seed):
    hp = algorithm_space("ERM", dataset_class(dataset)).sample(hparams_seed, trial_seed)
    small = dataset in ("RotatedMNIST", "RotatedDigits")
    if small:
        lr = _domainbed_draw(hparams_seed, trial_seed, "lr", lambda r: 10 ** r.uniform(-4.5, -2.5))
        bs = _domainbed_draw(hparams_seed, trial_seed, "batch_size", lambda r: int(2 ** r.uniform(3, 9)))
        wd = 0.0
    else:
        high = 5 if dataset == "DomainNet" else 5.5
        lr = _domainbed_draw(hparams_seed, trial_seed, "lr", lambda r: 10 ** r.uniform(-5, -3.5))
        bs = _domainbed_draw(hparams_seed, trial_seed, "batch_size", lambda r: int(2 ** r.uniform(3, high)))
        wd = _domainbed_draw(hparams_seed, trial_seed, "weight_decay", lambda r: 10 ** r.uniform(-6, -2))
    dropout = _domainbed_draw(hparams_seed, trial_seed, "resnet_dropout", lambda r: r.choice([0.0, 0.1, 0.5]))
    assert hp["lr"] == lr and hp["batch_size"] == bs and hp["weight_decay"] == wd
    assert hp["resnet_dropout"] == dropout


def test_pinned_erm_draws():
    pacs = algorithm_space("ERM", dataset_class("PACS")).sample(1, 0)
    assert pacs["lr"] == pytest.approx(2.7028930742148706e-05, rel=1e-12)
    assert pacs["batch_size"] == 39 and pacs["resnet_dropout"] == 0.5
    assert pacs["weight_decay"] == pytest.approx(0.00044832883881609976, rel=1e-12)
    assert algorithm_space("ERM", dataset_class("DomainNet")).sample(1, 0)["batch_size"] == 28
    digits = algorithm_space("ERM", dataset_class("RotatedDigits")).sample(2, 1)
    assert digits["lr"] == pytest.approx(0.0025521952552627065, rel=1e-12) and digits["batch_size"] == 61


def test_defaults_at_hparams_seed_zero():
    hp = algorithm_space("ERM", dataset_class("PACS")).sample(0, 5)
    assert (hp["lr"], hp["batch_size"], hp["weight_decay"], hp["resnet_dropout"]) == (5e-5, 32, 0.0, 0.0)
    small = algorithm_space("ERM", dataset_class("ColoredMNIST")).sample(0, 0)
    assert (small["lr"], small["batch_size"]) == (1e-3, 64)


def test_run_hash_ignores_where_things_live():
    args = {"dataset": "PACS", "algorithm": "ERM", "test_envs": [0], "hparams_seed": 1, "trial_seed": 0,
            "data_dir": "/a", "output_dir": "/x", "device": "cuda"}
    moved = {**args, "data_dir": "/b", "output_dir": "/y", "device": "cpu"}
    assert run_hash(args) == run_hash(moved)
    assert run_hash(args) != run_hash({**args, "hparams_seed": 2})
