"""The diffusion layer on tiny models: conditioning, samplers, guidance hook, cache and cost, leakage guard."""

import json

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from domainfusion_bench.costs import CostMeter
from domainfusion_bench.data.base import MultiDomainDataset
from domainfusion_bench.diffusion import (
    DDIMSampler,
    GenerationCache,
    LogDensityGuidance,
    PixelDDPMBackbone,
    PixelDDPMConfig,
    Request,
    SamplerConfig,
    StableDiffusionBackbone,
    build_backbone,
    guided_eps,
)
from domainfusion_bench.diffusion.cache import MANIFEST
from domainfusion_bench.diffusion.tiny import save_tiny_stable_diffusion, tiny_components
from domainfusion_bench.diffusion.trainer import default_config, train_pixel_ddpm
from domainfusion_bench.errors import DfbenchError

TINY = PixelDDPMConfig(resolution=16, patch_size=2, block_out_channels=(8, 16), norm_num_groups=4)
DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]


class HeldOutTripwire(Dataset):
    """A domain that fails the test if anything reads one of its images."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        raise AssertionError("the held-out domain's data was read")


class Toy(MultiDomainDataset):
    """4 RGB 16 px domains of 20 images, 3 classes; domain d is brighter by d/4."""

    input_shape = (3, 16, 16)
    num_classes = 3
    classes = ["a", "b", "c"]

    def __init__(self, tripwire: int | None = None):
        self.domains = list(DOMAINS)
        g = torch.Generator().manual_seed(0)
        self.envs = []
        for d in range(4):
            x = (torch.rand(20, 3, 16, 16, generator=g) * 0.5 + d / 8).clamp(0, 1)
            y = torch.arange(20) % 3
            self.envs.append(HeldOutTripwire(20) if d == tripwire else TensorDataset(x, y))


def pixel_backbone(seen=(0, 1, 2)):
    torch.manual_seed(0)
    return PixelDDPMBackbone.create(TINY, dataset="PACS", domains=DOMAINS, classes=["a", "b", "c"], image_channels=3,
                                    seen_domains=seen, key="toy").eval()


@pytest.fixture(scope="module")
def tiny_sd():
    return StableDiffusionBackbone.from_components(**tiny_components(), dataset="PACS", domains=DOMAINS,
                                                   classes=["dog", "guitar", "house"], image_channels=3)


# --- conditioning -----------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
def test_pixel_ddpm_conditioning_shapes_and_domain_mixing(prediction):
    torch.manual_seed(0)
    config = PixelDDPMConfig(**{**TINY.to_json(), "block_out_channels": (8, 16), "prediction": prediction})
    backbone = PixelDDPMBackbone.create(config, dataset="PACS", domains=DOMAINS, classes=["a", "b", "c"],
                                        image_channels=3).eval()
    x = torch.rand(5, 3, 24, 24)
    z = backbone.encode(x)
    assert z.shape == (5, 3, 16, 16) and backbone.latent_shape() == (3, 16, 16)
    assert z.min() >= -1 and z.max() <= 1
    cond = backbone.condition([0, 1, 2, -1, 1], [0, {1: 0.25, 2: 0.75}, 3, None, {}])
    assert cond.domain_weights.shape == (5, 4)
    assert cond.domain_weights[1].tolist() == [0.0, 0.25, 0.75, 0.0]
    assert cond.domains_used() == {0, 1, 2, 3}
    eps = backbone.eps(z, 500, cond)
    assert eps.shape == z.shape and torch.isfinite(eps).all()
    assert backbone.decode(z).shape == (5, 3, 16, 16)
    # a mix is the same mix of the domains' embeddings
    emb = backbone.model.cond
    e1, e2 = (emb(torch.tensor([1]), torch.eye(4)[[d]]) for d in (1, 2))
    mixed = emb(torch.tensor([1]), torch.tensor([[0.0, 0.25, 0.75, 0.0]]))
    torch.testing.assert_close(mixed, 0.25 * e1 + 0.75 * e2)
    with pytest.raises(DfbenchError, match="class ids"):
        backbone.condition([3], [0])
    with pytest.raises(DfbenchError, match="sum to at most 1"):
        backbone.condition([0], [{0: 0.7, 1: 0.7}])


def test_pixel_ddpm_config_checks_divisibility():
    with pytest.raises(DfbenchError, match="divisible"):
        PixelDDPMConfig(resolution=28, patch_size=2, block_out_channels=(8, 16, 32))


def test_tiny_stable_diffusion_conditioning_shapes(tiny_sd):
    x = torch.rand(2, 3, 16, 16)
    z = tiny_sd.encode(x)
    assert z.shape == (2, 4, 8, 8) == (2, *tiny_sd.latent_shape())
    cond = tiny_sd.condition([0, 1], [3, {0: 0.5, 2: 0.5}])
    assert cond.embedding.shape == (2, 16, 32)  # CLIP states: [B, tokens, hidden]
    assert cond.meta["prompts"][0] == "a dog, a sketch"  # the dataset's domain description table
    assert "a guitar, an art painting" in cond.meta["prompts"][1] and "a guitar, a photo" in cond.meta["prompts"][1]
    # a mix of domains = the same mix of the prompts' text states
    halves = tiny_sd.text_states(["a guitar, an art painting", "a guitar, a photo"]).mean(0)
    torch.testing.assert_close(cond.embedding[1], halves)
    assert tiny_sd.eps(z, 10, cond).shape == z.shape
    assert tiny_sd.decode(z).shape == (2, 3, 16, 16)
    prompted = tiny_sd.condition(prompts=["a dog in the snow", ""])
    assert prompted.embedding.shape == (2, 16, 32)


def test_stable_diffusion_loads_from_a_local_folder_offline(tmp_path):
    folder = save_tiny_stable_diffusion(tmp_path / "sd")
    backbone = build_backbone(f"sd:{folder}", dataset=Toy(), train_envs=[0, 1, 2], test_envs=[3],
                              cache_dir=tmp_path / "cache")
    assert backbone.kind == "stable_diffusion" and backbone.seen_domains == frozenset()
    assert backbone.key == build_backbone(f"sd:{folder}", dataset=Toy(), train_envs=[0, 1, 2], test_envs=[3],
                                          cache_dir=tmp_path / "cache").key
    out = DDIMSampler(backbone, SamplerConfig(steps=4)).img2img(torch.rand(2, 3, 16, 16), backbone.condition([0, 1], 0),
                                                                0.5, [1, 2], 1)
    assert out.images.shape == (2, 3, 16, 16) and out.nfe == [2, 2]
    with pytest.raises(DfbenchError, match="cannot load a Stable Diffusion checkpoint"):
        build_backbone(f"sd:{tmp_path / 'missing'}", dataset=Toy(), train_envs=[0], test_envs=[3], cache_dir=tmp_path)


# --- samplers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["pixel", "sd"])
def test_img2img_at_strength_zero_returns_the_input(which, tiny_sd):
    backbone = pixel_backbone() if which == "pixel" else tiny_sd
    x = torch.rand(3, 3, 16, 16)
    out = DDIMSampler(backbone, SamplerConfig(steps=10, guidance_scale=2.0)).img2img(
        x, backbone.condition([0, 1, 2], 1), 0.0, [0, 1, 2], 0)
    assert torch.equal(out.images, x) and out.nfe == [0, 0, 0]


def test_sampler_nfe_seeding_and_batch_independence():
    backbone = pixel_backbone()
    x = torch.rand(4, 3, 16, 16)
    cond = backbone.condition([0, 1, 2, 0], [1, 2, 0, {1: 0.5, 2: 0.5}])
    big = DDIMSampler(backbone, SamplerConfig(steps=10, guidance_scale=2.0, batch_size=4)).img2img(x, cond, 0.5, [7, 8, 9, 10], 0)
    small = DDIMSampler(backbone, SamplerConfig(steps=10, guidance_scale=2.0, batch_size=1)).img2img(x, cond, 0.5, [7, 8, 9, 10], 0)
    assert big.nfe == [10] * 4  # 5 of 10 DDIM steps, two denoiser calls each (classifier-free guidance)
    torch.testing.assert_close(big.images, small.images, atol=1e-5, rtol=0)
    other = DDIMSampler(backbone, SamplerConfig(steps=10, batch_size=4)).img2img(x, cond, 0.5, [1, 2, 3, 4], 0)
    assert other.nfe == [5] * 4 and not torch.allclose(other.images, big.images)
    full = DDIMSampler(backbone, SamplerConfig(steps=6)).sample(cond, [1, 2, 3, 4])
    assert full.images.shape == (4, 3, 16, 16) and full.nfe == [6] * 4
    assert full.images.min() >= 0 and full.images.max() <= 1


def test_guidance_terms_shift_eps_by_their_weighted_gradients():
    backbone = pixel_backbone()
    z, t = torch.randn(2, 3, 16, 16), torch.tensor([100, 700])
    cond = backbone.condition([0, 1], 0)
    target = torch.randn(2, 3, 16, 16)
    pull = LogDensityGuidance(lambda z, t, c: -0.5 * (z - target).pow(2).flatten(1).sum(1), weight=2.0)
    eps = torch.randn_like(z)
    abar = backbone.alphas_cumprod
    got = guided_eps(eps, z, t, abar, [pull, pull], cond)
    expected = eps - (1 - abar[t]).sqrt().view(-1, 1, 1, 1) * 4.0 * (target - z)
    torch.testing.assert_close(got, expected)
    assert guided_eps(eps, z, t, abar, [], cond) is eps
    sampler = DDIMSampler(backbone, SamplerConfig(steps=4), guidance=[pull])
    assert sampler.key(0.5) is None  # a term without a cache_key makes results uncacheable


# --- cache and cost -----------------------------------------------------------------------------------

def requests_for(x, seeds, domain=1):
    return [Request(class_id=i % 3, domains={domain: 1.0}, seed=s, source=x[i], source_domain=0,
                    source_ref={"index": i}) for i, s in enumerate(seeds)]


def test_cache_hits_misses_and_cost_counting(tmp_path):
    backbone = pixel_backbone()
    sampler = DDIMSampler(backbone, SamplerConfig(steps=10, guidance_scale=2.0, batch_size=2))
    cache = GenerationCache(tmp_path / "gen")
    x = torch.rand(3, 3, 16, 16)
    first, s1 = cache.img2img(sampler, requests_for(x, [1, 2, 3]), 0.5, made_by="run-a", progress=False)
    assert (s1.made_images, s1.made_nfe, s1.reused_images) == (3, 30, 0) and s1.made_seconds > 0
    lines = (tmp_path / "gen" / MANIFEST).read_text().splitlines()
    entry = json.loads(lines[0])
    assert len(lines) == 3 and entry["nfe"] == 10 and entry["source"]["index"] == 0
    assert entry["condition"]["domain_names"] == {"cartoon": 1.0} and entry["backbone_seen"] == [0, 1, 2]
    assert first.shape == (3, 3, 16, 16) and torch.equal(first, (first * 255).round() / 255)  # 8-bit, as stored

    # a second run: every image is a hit, identical, charged with its original cost as reused
    again, s2 = cache.img2img(sampler, requests_for(x, [1, 2, 3]), 0.5, made_by="run-b", progress=False)
    assert torch.equal(again, first)
    assert (s2.made_images, s2.reused_images, s2.reused_nfe) == (0, 3, 30)
    assert s2.reused_seconds == pytest.approx(s1.made_seconds)
    meter = CostMeter()
    s2.charge(meter)
    fields = meter.record_fields()
    assert fields["cost_generated_images"] == 3 and fields["cost_nfe"] == 30
    assert fields["cost_reused_generated_images"] == 3 and fields["cost_generation_seconds"] == pytest.approx(s1.made_seconds)

    # one new seed and one new target domain miss; the maker of a cached image is charged as its maker
    mixed = requests_for(x, [1, 2, 99]) + requests_for(x[:1], [1], domain=2)
    _, s3 = cache.img2img(sampler, mixed, 0.5, made_by="run-a", progress=False)
    assert (s3.made_images, s3.reused_images) == (4, 0)  # 2 own earlier images + 2 new ones
    _, s4 = cache.img2img(sampler, mixed, 0.5, made_by="run-c", progress=False)
    assert (s4.made_images, s4.reused_images, s4.reused_nfe) == (0, 4, 40)
    assert len((tmp_path / "gen" / MANIFEST).read_text().splitlines()) == 5
    # other strength or sampler settings are other images
    _, s5 = cache.img2img(sampler, requests_for(x, [1]), 0.3, progress=False)
    assert s5.made_images == 1 and s5.made_nfe == 6


def test_cache_survives_a_truncated_manifest_line(tmp_path):
    backbone = pixel_backbone()
    sampler = DDIMSampler(backbone, SamplerConfig(steps=4))
    cache = GenerationCache(tmp_path / "gen")
    x = torch.rand(2, 3, 16, 16)
    cache.img2img(sampler, requests_for(x, [1, 2]), 0.5, progress=False)
    with open(tmp_path / "gen" / MANIFEST, "a") as f:
        f.write('{"key": "abc", "fi')  # a process killed mid-write
    _, stats = cache.img2img(sampler, requests_for(x, [1, 2]), 0.5, progress=False)
    assert stats.reused_images == 2
    # the next entry written after the broken line is not glued onto it
    x3 = torch.rand(3, 3, 16, 16)
    _, made = cache.img2img(sampler, requests_for(x3, [3, 4, 5]), 0.5, progress=False)
    _, found = GenerationCache(tmp_path / "gen").img2img(sampler, requests_for(x3, [3, 4, 5]), 0.5, progress=False)
    assert made.made_images == 3 and found.reused_images == 3


# --- leakage guard --------------------------------------------------------------------------------------

def test_leakage_guard_refuses_every_path_to_the_held_out_domain(tmp_path):
    backbone = pixel_backbone(seen=(0, 1, 2)).restrict([3])
    sampler = DDIMSampler(backbone, SamplerConfig(steps=4))
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(DfbenchError, match="condition on held-out domain 'sketch'"):
        backbone.condition([0, 1], 3)
    with pytest.raises(DfbenchError, match="condition on held-out"):
        backbone.condition([0], [{0: 0.9, 3: 0.1}])  # a mix that touches it
    with pytest.raises(DfbenchError, match="generate from images of held-out"):
        sampler.img2img(x, backbone.condition([0, 1], 1), 0.5, [1, 2], [0, 3])
    bad = [Request(class_id=0, domains={1: 1.0}, seed=1, source=x[0], source_domain=3)]
    with pytest.raises(DfbenchError, match="generate from images of held-out"):
        GenerationCache(tmp_path / "gen").img2img(sampler, bad, 0.5, progress=False)
    assert not (tmp_path / "gen" / MANIFEST).exists()
    # a backbone that saw a domain cannot serve a run holding it out
    with pytest.raises(DfbenchError, match="which saw held-out domain 'photo'"):
        pixel_backbone(seen=(0, 1, 2)).restrict([2])
    # the oracle may condition on it, but still never start from it
    oracle = pixel_backbone(seen=(0, 1, 2)).restrict([3], allow_condition=True)
    assert oracle.condition([0], 3).domains_used() == {3}
    with pytest.raises(DfbenchError, match="generate from images of held-out"):
        DDIMSampler(oracle, SamplerConfig(steps=4)).img2img(x[:1], oracle.condition([0], 3), 0.5, [1], 3)


def test_ddpm_training_never_reads_or_trains_on_the_held_out_domain(tmp_path):
    with pytest.raises(DfbenchError, match="train a diffusion model on held-out domain"):
        train_pixel_ddpm(Toy(), [0, 1, 3], [3], cache_dir=tmp_path, progress=False)
    config = default_config(Toy(), steps=3, batch_size=8, block_out_channels=(8, 16), norm_num_groups=4, shared_trials=0)
    meter = CostMeter()
    first = train_pixel_ddpm(Toy(tripwire=3), [0, 1, 2], [3], config=config, cache_dir=tmp_path, progress=False,
                             costs=meter, made_by="run-a")
    assert not first.reused and first.backbone.seen_domains == {0, 1, 2}
    assert first.backbone.info["trained_on"]["art_painting"]["n"] == 16  # the in-split: 20 - int(20 * 0.2)
    assert meter.totals["diffusion_train_seconds"] == pytest.approx(first.train_seconds) and first.train_seconds > 0
    assert "reused_diffusion_train_seconds" not in meter.totals
    # the second run loads it from the cache, reports its seconds as reused, and did not move the global RNG
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    meter2 = CostMeter()
    second = train_pixel_ddpm(Toy(tripwire=3), [2, 1, 0], [3], config=config, cache_dir=tmp_path, progress=False,
                              costs=meter2, made_by="run-b")
    assert torch.equal(torch.rand(1), expected)
    assert second.reused and second.path == first.path
    assert meter2.totals["reused_diffusion_train_seconds"] == pytest.approx(first.train_seconds)
    for a, b in zip(first.backbone.model.state_dict().values(), second.backbone.model.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu())
    # other held-out domains or another split seed are other models
    other = train_pixel_ddpm(Toy(), [0, 1, 3], [2], config=config, cache_dir=tmp_path, progress=False)
    assert other.path != first.path and other.backbone.seen_domains == {0, 1, 3}
    with pytest.raises(DfbenchError, match="which saw held-out domain 'sketch'"):
        other.backbone.restrict([3])
