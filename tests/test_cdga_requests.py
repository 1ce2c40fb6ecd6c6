"""CDGA's generation plan pinned by hand: every source image of training domain i is conditioned on its own
class and on each OTHER training domain j (or on the mix (1 - a) i + a j with a drawn per image), never on
i alone or on a held-out domain; CDGA* adds the held-out domain(s)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from domainfusion_bench.algorithms.cdga import CDGA, CDGAOracle
from domainfusion_bench.protocol import seed_hash

DOMAINS = ["held", "a", "b", "c"]
TRIAL = 3


def plan(cls, env, interpolation, k=2):
    images = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(env))
    labels = torch.tensor([4, 1, 7, 1, 9])
    split = SimpleNamespace(indices=[3, 0, 4], dataset=list(zip(images, labels)))
    context = SimpleNamespace(dataset=SimpleNamespace(name="toy", domains=DOMAINS, item_to_unit=lambda x: x),
                              args=SimpleNamespace(trial_seed=TRIAL), train_envs=[1, 2, 3], test_envs=[0])
    algorithm = cls.__new__(cls)
    algorithm.hparams = {"cdga_max_sources": 0, "cdga_k": k, "cdga_interpolation": interpolation}
    return algorithm.requests(context, split, env, SimpleNamespace(resolution=4)), images, labels


@pytest.mark.parametrize("env", [1, 2, 3])
def test_each_source_goes_toward_every_other_training_domain(env):
    requests, images, labels = plan(CDGA, env, interpolation=False)
    others = sorted({1, 2, 3} - {env})
    assert len(requests) == 3 * len(others) * 2
    for n, idx in enumerate([3, 0, 4]):
        mine = requests[n * 4:(n + 1) * 4]  # (target j, repeat r) for this source, in order
        assert [r.domains for r in mine] == [{j: 1.0} for j in others for _ in range(2)]
        assert all(r.class_id == labels[idx] and r.source_domain == env for r in mine)
        assert all(torch.equal(r.source, images[idx]) and r.source_ref["index"] == idx for r in mine)
        assert [r.seed for r in mine] == [seed_hash("CDGA", TRIAL, env, idx, j, r) for j in others for r in range(2)]


def test_interpolated_condition_is_the_drawn_share_of_the_target_domain():
    requests, _, _ = plan(CDGA, 1, interpolation=True, k=1)
    for r, (idx, j) in zip(requests, [(i, j) for i in (3, 0, 4) for j in (2, 3)]):
        a = np.random.RandomState(seed_hash("CDGA-mix", TRIAL, 1, idx, j, 0)).uniform()
        assert r.domains.keys() == {1, j} and r.domains[j] == pytest.approx(a) and r.domains[1] == pytest.approx(1 - a)


def test_only_the_oracle_conditions_on_the_held_out_domain():
    dg, _, _ = plan(CDGA, 2, interpolation=True)
    oracle, _, _ = plan(CDGAOracle, 2, interpolation=False)
    assert all(0 not in r.domains for r in dg)
    assert sorted({next(iter(r.domains)) for r in oracle}) == [0, 1, 3]
