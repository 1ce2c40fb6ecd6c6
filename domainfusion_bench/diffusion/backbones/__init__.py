"""Diffusion backbones: one interface over diffusers models, used by every generative algorithm.

A ``Backbone`` is the frozen "model" part of a diffusers pipeline, with the dataset knowledge added:

- ``encode(x) / decode(z)``: images in [0, 1] (the dataset's channels) <-> the denoiser's space
  (identity up to scale and resolution for pixel models, the VAE for latent models). Both are plain
  differentiable functions (DomainFusion back-propagates through ``encode``).
- ``eps(z_t, t, condition)``: always the noise. Whatever the network predicts (``prediction_type``:
  ``epsilon``, ``v_prediction`` or ``sample`` = x0, as in diffusers' scheduler configs) is converted by
  ``to_eps`` before a sampler or a guidance term sees it.
- ``alphas_cumprod`` (the alpha-bar table), ``abar(t)`` (broadcastable against latents), ``add_noise``,
  ``x0_from_eps`` / ``eps_from_x0`` / ``eps_from_v``, ``num_train_timesteps`` and
  ``inference_scheduler()`` (a fresh diffusers DDIMScheduler for samplers, told that it gets eps).
- ``condition(class_ids, domains, prompts, extra)``: a ``Condition`` from class ids, domain ids or a
  weighted mix of domains, prompts (text models), and an optional extra vector (kept on its device and
  in the autograd graph, so a trainable feature encoder can feed it). It runs the leakage guard.
- ``seen_domains``: the dataset domains whose images trained it (empty for a web-pretrained model);
  ``restrict(held_out)`` installs a run's ``LeakageGuard`` and refuses a backbone that saw a held-out domain.

Schedulers and samplers live apart (samplers.py); training lives in trainer.py.
"""

from domainfusion_bench.diffusion.backbones.base import BACKBONES, Backbone, parameters_digest, resize
from domainfusion_bench.diffusion.backbones.pixel_ddpm import (
    ConditionEmbedding,
    PixelDDPM,
    PixelDDPMBackbone,
    PixelDDPMConfig,
)
from domainfusion_bench.diffusion.backbones.spec import BackboneSpec
from domainfusion_bench.diffusion.backbones.stable_diffusion import StableDiffusionBackbone

__all__ = [
    "BACKBONES", "Backbone", "parameters_digest", "resize", "ConditionEmbedding", "PixelDDPM", "PixelDDPMBackbone",
    "PixelDDPMConfig", "BackboneSpec", "StableDiffusionBackbone",
]
