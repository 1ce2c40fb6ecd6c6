"""Samplers and the numerics under them, checked against analytic models and diffusers itself.

The exact backbone (diffusion/tiny.py) is the exact denoiser of a one-image dataset, so its noise
prediction on a noised sample is the true noise and DDIM from it must end exactly at that image.
"""

import threading

import pytest
import torch
from torch import nn

from domainfusion_bench.costs import CostMeter
from domainfusion_bench.diffusion import (
    Backbone,
    ClassifierGuidance,
    DDIMSampler,
    GenerationCache,
    LogDensityGuidance,
    PixelDDPMBackbone,
    PixelDDPMConfig,
    Request,
    SamplerConfig,
    StableDiffusionBackbone,
    guided_eps,
)
from domainfusion_bench.diffusion.tiny import exact_backbone, tiny_components

TINY = PixelDDPMConfig(resolution=16, patch_size=2, block_out_channels=(8, 16), norm_num_groups=4)
DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]
PREDICTIONS = ["epsilon", "v_prediction", "sample"]


def pixel_backbone(prediction="epsilon", extra_dim=0):
    torch.manual_seed(0)
    config = PixelDDPMConfig(**{**TINY.to_json(), "prediction": prediction, "extra_dim": extra_dim})
    return PixelDDPMBackbone.create(config, dataset="PACS", domains=DOMAINS, classes=["a", "b", "c"], image_channels=3,
                                    seen_domains=(0, 1, 2), key=f"toy-{prediction}").eval()


class Reparametrised(Backbone):
    """``inner`` (an eps-model) re-expressed as a model predicting ``prediction_type``: the same denoiser,
    so every sampler must give the same images from it."""

    def __init__(self, inner: Backbone, prediction_type: str):
        from diffusers import DDPMScheduler

        config = dict(inner.train_scheduler.config)
        config["prediction_type"] = prediction_type
        super().__init__(dataset=inner.dataset, domains=inner.domains, classes=inner.classes,
                         image_channels=inner.image_channels, resolution=inner.resolution,
                         scheduler=DDPMScheduler.from_config(config), key=f"{inner.key}-{prediction_type}")
        self.inner = inner
        self.guard = inner.guard

    def modules(self):
        return self.inner.modules()

    def latent_shape(self):
        return self.inner.latent_shape()

    def encode(self, x):
        return self.inner.encode(x)

    def decode(self, z):
        return self.inner.decode(z)

    def _embed(self, cond):
        return self.inner._embed(cond)

    def _predict(self, z_t, t, cond):
        eps = self.inner.eps(z_t, t, cond)
        abar = self.abar(t, z_t.dim())
        x0 = (z_t - (1 - abar).sqrt() * eps) / abar.sqrt()
        return {"epsilon": eps, "sample": x0, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[self.prediction_type]


def pull_toward(point: float, weight: float = 1.0):
    return LogDensityGuidance(lambda z, t, c: -0.5 * (z - point).pow(2).flatten(1).sum(1), weight=weight,
                              cache_key=f"pull{point}")


# --- eps is the noise --------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_eps_is_the_true_noise_whatever_the_model_predicts(prediction):
    target = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
    backbone = exact_backbone(target, prediction)
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 10, 500, 999])
    z_t = backbone.add_noise(target.expand(4, -1, -1, -1), noise, t)
    cond = backbone.condition(batch=4)
    eps = backbone.eps(z_t, t, cond)
    torch.testing.assert_close(eps, noise, atol=2e-4, rtol=0)
    torch.testing.assert_close(backbone.x0_from_eps(z_t, eps, t), target.expand(4, -1, -1, -1), atol=2e-3, rtol=0)
    assert backbone.abar(t).shape == (4, 1, 1, 1) and backbone.abar(7).shape == (1, 1, 1, 1)
    assert backbone.inference_scheduler().config.prediction_type == "epsilon"  # the sampler hands it eps


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_from_the_exact_denoiser_ends_exactly_at_its_image(prediction, eta):
    """The last step lands on alpha-bar 1 (t = 0): the result is the clean prediction, not x0 re-noised."""
    target = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
    backbone = exact_backbone(target, prediction)
    sampler = DDIMSampler(backbone, SamplerConfig(steps=5, eta=eta))
    out = sampler.sample(backbone.condition(batch=3), [1, 2, 3])
    torch.testing.assert_close(out.latents, target.expand(3, -1, -1, -1), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.images, (target.expand(3, -1, -1, -1) + 1) / 2, atol=1e-4, rtol=0)
    scheduler = backbone.inference_scheduler()
    scheduler.set_timesteps(5)
    assert int(scheduler.timesteps[-1]) == 0 and float(scheduler.final_alpha_cumprod) == 1.0


def test_stable_diffusion_final_step_lands_on_alpha_bar_one():
    sd = StableDiffusionBackbone.from_components(**tiny_components(), dataset="PACS", domains=DOMAINS,
                                                 classes=["a", "b", "c"], image_channels=3)
    scheduler = sd.inference_scheduler()
    scheduler.set_timesteps(10)
    assert int(scheduler.timesteps[-1]) == 1  # SD's steps_offset: its lowest trained timestep
    assert float(scheduler.final_alpha_cumprod) == 1.0 and scheduler.config.prediction_type == "epsilon"


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_a_reparametrised_model_samples_the_same_images(prediction):
    eps_model = pixel_backbone("epsilon")
    other = Reparametrised(eps_model, prediction)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ca, cb = (m.condition([0, 2], [0, {0: 0.5, 1: 0.5}]) for m in (eps_model, other))
    config = SamplerConfig(steps=4, guidance_scale=2.0)
    torch.testing.assert_close(DDIMSampler(other, config).sample(cb, [1, 2]).latents,
                               DDIMSampler(eps_model, config).sample(ca, [1, 2]).latents, atol=1e-4, rtol=0)
    a, b = (DDIMSampler(m, config, [pull_toward(0.5, 0.3)]) for m in (eps_model, other))
    torch.testing.assert_close(b.sample(cb, [1, 2]).latents, a.sample(ca, [1, 2]).latents, atol=1e-4, rtol=0)
    torch.testing.assert_close(b.img2img(x, cb, 0.7, [4, 5], 0).latents, a.img2img(x, ca, 0.7, [4, 5], 0).latents,
                               atol=1e-4, rtol=0)


def test_pixel_ddpm_x0_model_converts_through_the_shared_helper():
    backbone = pixel_backbone("sample")
    z, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 800])
    cond = backbone.condition([0, 1], 0)
    x0 = backbone.model(z, t, cond.class_ids, cond.domain_weights)
    torch.testing.assert_close(backbone.eps(z, t, cond), backbone.eps_from_x0(z, x0, t))
    torch.testing.assert_close(backbone.x0_from_eps(z, backbone.eps(z, t, cond), t), x0, atol=1e-4, rtol=0)


# --- diffusers equivalence ----------------------------------------------------------------------------

@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_img2img_equals_diffusers_img2img_pipeline(guidance_scale):
    """Our img2img vs diffusers' StableDiffusionImg2ImgPipeline on tiny random SD components, same
    scheduler, prompt states, per-image generators and strength. The pipeline is handed our encoded
    latents (a 4-channel "image" skips its VAE sampling), so the comparison is of the denoising loop:
    noising to the strength's first timestep, classifier-free guidance and DDIM steps."""
    from diffusers import StableDiffusionImg2ImgPipeline

    parts = tiny_components()
    sd = StableDiffusionBackbone.from_components(**parts, dataset="PACS", domains=DOMAINS,
                                                 classes=["dog", "guitar", "house"], image_channels=3)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    seeds, strength, steps = [11, 12], 0.6, 10
    cond = sd.condition([0, 1], [0, 2])
    ours = DDIMSampler(sd, SamplerConfig(steps=steps, guidance_scale=guidance_scale)).img2img(x, cond, strength, seeds, 0)
    pipe = StableDiffusionImg2ImgPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                                          unet=parts["unet"], scheduler=sd.inference_scheduler(), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        z0 = sd.encode(x)
        theirs = pipe(prompt_embeds=cond.embedding, negative_prompt_embeds=sd.null_condition(2).embedding, image=z0,
                      strength=strength, num_inference_steps=steps, guidance_scale=guidance_scale,
                      generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent").images
    assert ours.nfe == [int(steps * strength) * (2 if guidance_scale != 1 else 1)] * 2
    torch.testing.assert_close(ours.latents, theirs, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours.latents, z0, atol=1e-2)  # it did denoise something


# --- guidance ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_a_guidance_term_moves_samples_its_way_and_is_counted(prediction):
    """On N(0, I) data, a pull toward the point p (log g = -|z - p|^2 / 2) moves every sample toward p
    (the tilted distribution's mean is p / 2); a pull the other way moves it the other way."""
    backbone = exact_backbone(None, prediction)
    cond = backbone.condition(batch=4)
    seeds = [1, 2, 3, 4]
    base = DDIMSampler(backbone, SamplerConfig(steps=5)).sample(cond, seeds)
    assert base.guidance_evals == [0] * 4
    up = DDIMSampler(backbone, SamplerConfig(steps=5), [pull_toward(0.8)]).sample(cond, seeds)
    down = DDIMSampler(backbone, SamplerConfig(steps=5), [pull_toward(-0.8)]).sample(cond, seeds)
    shift_up = (up.latents - base.latents).mean(dim=(1, 2, 3))
    shift_down = (down.latents - base.latents).mean(dim=(1, 2, 3))
    assert (shift_up > 0.2).all() and (shift_down < -0.2).all(), (shift_up, shift_down)
    # everything is affine in the point here: +p and -p average to a pull toward 0, and so do two half-pulls
    centre = DDIMSampler(backbone, SamplerConfig(steps=5), [pull_toward(0.0)]).sample(cond, seeds)
    torch.testing.assert_close((up.latents + down.latents) / 2, centre.latents, atol=1e-4, rtol=0)
    both = DDIMSampler(backbone, SamplerConfig(steps=5), [pull_toward(0.8, 0.5), pull_toward(-0.8, 0.5)]).sample(cond, seeds)
    torch.testing.assert_close(both.latents, centre.latents, atol=1e-4, rtol=0)
    assert up.guidance_evals == [5] * 4 and both.guidance_evals == [10] * 4 and both.nfe == [5] * 4


def test_guidance_evals_are_charged_as_cost_and_reuse(tmp_path):
    backbone = pixel_backbone("epsilon")
    sampler = DDIMSampler(backbone, SamplerConfig(steps=4), [pull_toward(0.5, 0.1)])
    cache = GenerationCache(tmp_path / "gen")
    requests = [Request(class_id=i, domains={1: 1.0}, seed=i) for i in range(3)]
    _, made = cache.sample(sampler, requests, progress=False)
    _, reused = GenerationCache(tmp_path / "gen").sample(sampler, requests, progress=False)
    assert made.made_guidance_evals == 12 and reused.reused_guidance_evals == 12 and reused.made_images == 0
    meter = CostMeter()
    reused.charge(meter)
    fields = meter.record_fields()
    assert fields["cost_guidance_evals"] == 12 and fields["cost_reused_guidance_evals"] == 12
    plain = CostMeter()
    cache.sample(DDIMSampler(backbone, SamplerConfig(steps=4)), requests, progress=False)[1].charge(plain)
    assert "cost_guidance_evals" not in plain.record_fields()  # records of unguided methods are unchanged


class NoisyClassifier(nn.Module):
    """Logits from a linear read of z_t plus a class-dependent bias on the *condition's* class."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.read = nn.Linear(3 * 16 * 16, 3)
        self.by_class = nn.Embedding(3, 3 * 16 * 16)
        self.seen = []

    def forward(self, z, t, cond):
        self.seen.append(cond)
        y = cond.class_ids.to(z.device)
        return self.read((z * self.by_class(y).view_as(z)).flatten(1))


def test_classifier_guidance_sees_the_condition_and_can_build_a_graph():
    backbone = pixel_backbone("epsilon")
    classifier = NoisyClassifier()
    term = ClassifierGuidance(classifier, target=0)
    z, t = torch.randn(2, 3, 16, 16), torch.tensor([50, 600])
    g0 = term.grad_log(z, t, backbone.condition([0, 0], 1))
    g1 = term.grad_log(z, t, backbone.condition([1, 1], 1))
    assert classifier.seen[-1].class_ids.tolist() == [1, 1] and not torch.allclose(g0, g1)
    assert not g0.requires_grad  # the sampler's default: no graph kept
    # TGDP-style: a loss on the guidance gradient trains the guidance network
    g = term.grad_log(z, t, backbone.condition([0, 1], 1), create_graph=True)
    g.pow(2).sum().backward()
    assert classifier.read.weight.grad.abs().sum() > 0 and classifier.by_class.weight.grad.abs().sum() > 0
    classifier.zero_grad()
    eps = guided_eps(torch.zeros_like(z), z, t, backbone.alphas_cumprod, [term], backbone.condition([0, 1], 1),
                     create_graph=True)
    eps.sum().backward()
    assert classifier.read.weight.grad.abs().sum() > 0


# --- eta, devices, gradients --------------------------------------------------------------------------

def test_eta_noise_is_per_image():
    backbone = pixel_backbone("epsilon")
    cond = backbone.condition([0, 1], [1, 2])
    config = SamplerConfig(steps=5, eta=1.0)
    pair = DDIMSampler(backbone, config).sample(cond, [7, 8])
    alone = [DDIMSampler(backbone, config).sample(cond.select([i]), [s]) for i, s in enumerate([7, 8])]
    torch.testing.assert_close(pair.latents, torch.cat([a.latents for a in alone]), atol=1e-5, rtol=0)
    deterministic = DDIMSampler(backbone, SamplerConfig(steps=5)).sample(cond, [7, 8])
    assert (pair.latents - deterministic.latents).abs().mean() > 1e-2  # the noise is really added
    torch.testing.assert_close(pair.images, backbone.decode(pair.latents))
    assert pair.latents.device.type == "cpu" and pair.images.device.type == "cpu"


def test_encode_extra_and_eval_keep_gradients():
    backbone = pixel_backbone("epsilon", extra_dim=4)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    backbone.encode(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    feats = torch.randn(2, 4, requires_grad=True)
    cond = backbone.condition([0, 1], 1, extra=feats)
    assert cond.extra.requires_grad
    backbone.eps(torch.randn(2, 3, 16, 16), 300, cond).pow(2).sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in backbone.model.parameters())  # plain eval() freezes the model
    backbone.eval(trainable_extra=True)
    trainable = [p for p in backbone.model.parameters() if p.requires_grad]
    assert trainable and {id(p) for p in trainable} == {id(p) for p in backbone.extra_parameters()}
    backbone.eps(torch.randn(2, 3, 16, 16), 300, backbone.condition([0, 1], 1, extra=feats)).sum().backward()
    assert backbone.model.cond.extra.weight.grad.abs().sum() > 0


def test_stable_diffusion_encode_is_differentiable():
    sd = StableDiffusionBackbone.from_components(**tiny_components(), dataset="PACS", domains=DOMAINS,
                                                 classes=["a", "b", "c"], image_channels=3)
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    sd.encode(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# --- generation cache: per-chunk locks ----------------------------------------------------------------

def test_cache_locks_per_chunk_and_keys_ignore_batch_size(tmp_path):
    backbone = pixel_backbone("epsilon")
    sampler = DDIMSampler(backbone, SamplerConfig(steps=3, batch_size=4))
    a = [Request(class_id=0, domains={1: 1.0}, seed=s) for s in (1, 2)]
    b = [Request(class_id=1, domains={2: 1.0}, seed=s) for s in (1, 2)]
    cache = GenerationCache(tmp_path / "gen")
    assert cache.keys(sampler, a) == cache.keys(DDIMSampler(backbone, SamplerConfig(steps=3, batch_size=1)), a)
    assert cache.keys(sampler, a) != cache.keys(DDIMSampler(backbone, SamplerConfig(steps=4)), a)
    done = {}
    waiter = threading.Thread(target=lambda: done.update(
        stats=GenerationCache(tmp_path / "gen").sample(sampler, a, progress=False)[1]))
    with cache._chunk_lock(cache.keys(sampler, a)):  # another run is making chunk a
        _, other = GenerationCache(tmp_path / "gen").sample(sampler, b, progress=False)  # b does not wait for it
        assert other.made_images == 2
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive()  # the same chunk waits
    waiter.join(120)
    assert done["stats"].made_images == 2


def test_same_requests_in_parallel_are_generated_once(tmp_path):
    backbone = pixel_backbone("epsilon")
    calls = []

    class Counting(DDIMSampler):
        def sample(self, cond, seeds, keep_on_device=False):
            calls.append(list(seeds))
            return super().sample(cond, seeds, keep_on_device)

    requests = [Request(class_id=i % 3, domains={0: 1.0}, seed=i) for i in range(4)]
    results = []
    threads = [threading.Thread(target=lambda: results.append(GenerationCache(tmp_path / "gen").sample(
        Counting(backbone, SamplerConfig(steps=3, batch_size=2)), requests, progress=False))) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert sorted(s for c in calls for s in c) == [0, 1, 2, 3]
    assert torch.equal(results[0][0], results[1][0])
    assert sum(r[1].made_images for r in results) == 4 and sum(r[1].reused_images for r in results) == 4
