"""The diffusion layer: backbones over diffusers, a trainer for small pixel DDPMs, DDIM samplers with
classifier-free guidance and a guidance-term hook, a content-addressed generation cache, and the
leakage guard. Generative algorithms (CDGA, DomainFusion, DiTi, TGDP, oracle guidance) build on it:

    backbone = build_backbone("pixel_ddpm", dataset=..., train_envs=..., test_envs=..., cache_dir=...)
    sampler = DDIMSampler(backbone, SamplerConfig(steps=20, guidance_scale=3.0), guidance=[...])
    images, stats = GenerationCache(cache_dir / "generations").img2img(sampler, requests, strength=0.5)
    stats.charge(context.costs)

Conventions every method relies on: ``backbone.eps`` is always the noise (v- and x0-models are converted
in ``Backbone.to_eps``); ``abar(t)``, ``x0_from_eps``, ``eps_from_x0``, ``eps_from_v`` are the schedule's
algebra; ``encode``/``decode`` and ``Condition.extra`` keep gradients; ``GuidanceTerm.grad_log(z_t, t,
cond, create_graph=False)``; ``DDIMSampler.sample/img2img(..., keep_on_device=False)`` return
``SampleOutput(images, nfe, seconds, latents, guidance_evals)``, the last DDIM step ending on the clean
x0 prediction; ``LeakageGuard(dataset, domains, held_out, allow_condition=False, few_shot_target=0)``.
``diffusion.tiny.exact_backbone`` is an exact analytic denoiser for tests.
"""

from domainfusion_bench.diffusion.backbones import (
    BACKBONES,
    Backbone,
    BackboneSpec,
    PixelDDPMBackbone,
    PixelDDPMConfig,
    StableDiffusionBackbone,
)
from domainfusion_bench.diffusion.cache import GenerationCache, GenerationStats, Request
from domainfusion_bench.diffusion.conditions import (
    DOMAIN_DESCRIPTIONS,
    Condition,
    LeakageGuard,
    domain_description,
    mix,
)
from domainfusion_bench.diffusion.factory import build_backbone
from domainfusion_bench.diffusion.samplers import (
    ClassifierGuidance,
    DDIMSampler,
    GuidanceTerm,
    LogDensityGuidance,
    SampleOutput,
    SamplerConfig,
    guided_eps,
)
from domainfusion_bench.diffusion.trainer import DDPMTrainConfig, default_config, train_pixel_ddpm

__all__ = [
    "BACKBONES", "Backbone", "BackboneSpec", "PixelDDPMBackbone", "PixelDDPMConfig", "StableDiffusionBackbone",
    "GenerationCache", "GenerationStats", "Request", "DOMAIN_DESCRIPTIONS", "Condition", "LeakageGuard",
    "domain_description", "mix", "build_backbone", "ClassifierGuidance", "DDIMSampler", "GuidanceTerm",
    "LogDensityGuidance", "SampleOutput", "SamplerConfig", "guided_eps", "DDPMTrainConfig", "default_config",
    "train_pixel_ddpm",
]
