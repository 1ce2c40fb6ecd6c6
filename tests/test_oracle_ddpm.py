"""The oracle DDPM (CDGA*'s generator): fine-tuned from the run's DDPM on the held-out domain's out-split too,
never on its in-split, per trial, and refused to every non-oracle run."""

import hashlib
import json

import pytest
import torch

from domainfusion_bench.diffusion import LeakageGuard
from domainfusion_bench.diffusion.oracle_ddpm import oracle_indices, train_oracle_ddpm
from domainfusion_bench.diffusion.store import ModelStore
from domainfusion_bench.diffusion.trainer import SplitImages, _batches, train_pixel_ddpm
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.protocol import split_indices
from tests.test_ddpm_sharing import Toy, config


def sha(indices):
    return hashlib.sha256(json.dumps(sorted(indices)).encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    store = ModelStore(tmp_path_factory.mktemp("models"), shipped=None)
    base = train_pixel_ddpm(Toy(), [0, 1, 2], [3], config=config(), store=store, progress=False, made_by="base")
    oracles = {seed: train_oracle_ddpm(base.backbone, Toy(), [0, 1, 2], [3], trial_seed=seed, holdout_fraction=0.2,
                                       config=config(), store=store, device="cpu", steps=3, progress=False,
                                       made_by=f"oracle-{seed}") for seed in (0, 1)}
    return base, oracles


def test_it_sees_the_held_out_out_split_of_its_trial_and_not_one_in_split_image(models):
    _, oracles = models
    for seed, oracle in oracles.items():
        out, _ = split_indices(30, seed, 3, 0.2)
        trained_on = oracle.backbone.info["trained_on"]
        assert trained_on["z"] == {"n": len(out), "indices_sha": sha(out)}
        assert sorted(oracle.backbone.seen_domains) == [0, 1, 2, 3]
    assert oracles[0].key != oracles[1].key  # one per trial: each trial has its own out-split
    assert oracles[0].backbone.info["trained_on"]["w"] == oracles[1].backbone.info["trained_on"]["w"]  # shared in-split


def test_it_starts_from_the_base_ddpm_and_trains_the_held_out_embedding(models):
    base, oracles = models
    held = oracles[0].backbone.model.cond.domains.weight[3]
    assert not torch.equal(held, base.backbone.model.cond.domains.weight[3])  # an unused row gets no gradient
    assert torch.equal(base.backbone.model.cond.domains.weight[3],  # the base model itself is untouched
                       train_pixel_ddpm(Toy(), [0, 1, 2], [3], config=config(), store=ModelStore(
                           oracles[0].path.parent.parent, shipped=None), progress=False).backbone.model.cond.domains.weight[3])


def test_only_an_oracle_guard_accepts_it(models):
    _, oracles = models
    with pytest.raises(DfbenchError, match="which saw held-out domain 'z'"):
        oracles[0].backbone.restrict([3])
    with pytest.raises(DfbenchError, match="only an oracle variant"):
        LeakageGuard("Toy", Toy().domains, [3], oracle_out_split=True)
    guard = LeakageGuard("Toy", Toy().domains, [3], allow_condition=True, oracle_out_split=True)
    out, inside = split_indices(30, 0, 3, 0.2)
    guard.check_out_split(3, out, out)
    with pytest.raises(DfbenchError, match="1 in-split images of held-out domain 'z'"):
        guard.check_out_split(3, list(out) + [inside[0]], out)
    with pytest.raises(DfbenchError, match="Only oracle variants may see a held-out out-split"):
        LeakageGuard("Toy", Toy().domains, [3], allow_condition=True).check_out_split(3, out, out)
    indices = oracle_indices(Toy(), [0, 1, 2], [3], 0, 0.2, 3, guard)
    assert indices[3] == sorted(out) and not set(indices[3]) & set(inside)


def test_balanced_batches_draw_every_domain_equally_often():
    cfg = config()
    data = SplitImages(Toy(), {0: range(24), 3: range(6)}, 16)  # 4:1 by size
    domains = torch.cat([next(b)[2] for b in [_batches(data, cfg, 0, balanced=True)] for _ in range(400)])
    assert abs((domains == 3).float().mean().item() - 0.5) < 0.05
    plain = torch.cat([next(b)[2] for b in [_batches(data, cfg, 0)] for _ in range(400)])
    assert abs((plain == 3).float().mean().item() - 0.2) < 0.05


def test_an_oracle_row_still_never_takes_a_cached_image_made_from_a_held_out_source(models, tmp_path):
    """The oracle guard lets a model that saw the held-out out-split through; a cached image made *from* a
    held-out image (here: a tampered manifest) is still refused."""
    from domainfusion_bench.diffusion import DDIMSampler, GenerationCache, Request, SamplerConfig
    from domainfusion_bench.diffusion.cache import MANIFEST

    _, oracles = models
    backbone = oracles[0].backbone
    sampler = DDIMSampler(backbone, SamplerConfig(steps=2))
    x = torch.rand(1, 3, 16, 16)
    request = [Request(class_id=0, domains={3: 1.0}, seed=1, source=x[0], source_domain=0)]
    cache = GenerationCache(tmp_path / "gen")
    cache.img2img(sampler, request, 0.5, progress=False)
    manifest = tmp_path / "gen" / MANIFEST
    entries = [json.loads(line) for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps({**e, "source_domain": 3}) + "\n" for e in entries))
    with pytest.raises(DfbenchError, match="generate from images of held-out domain 'z'"):
        GenerationCache(tmp_path / "gen").img2img(sampler, request, 0.5, progress=False)
