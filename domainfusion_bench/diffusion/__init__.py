"""The diffusion layer: backbones over diffusers, a trainer for small pixel DDPMs, DDIM samplers with
classifier-free guidance and a guidance-term hook, a content-addressed generation cache, and the
leakage guard. Generative algorithms (CDGA, DomainFusion, DiTi, TGDP, oracle guidance) build on it:

    backbone = build_backbone("pixel_ddpm", dataset=..., train_envs=..., test_envs=..., cache_dir=...)
    sampler = DDIMSampler(backbone, SamplerConfig(steps=20, guidance_scale=3.0), guidance=[...])
    images, stats = GenerationCache(cache_dir / "generations").img2img(sampler, requests, strength=0.5)
    stats.charge(context.costs)
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
