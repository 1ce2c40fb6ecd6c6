"""Samplers over any Backbone: full sampling and image-to-image with DDIM, classifier-free guidance,
and one hook for a sum of guidance terms (classifier, TGDP, oracle guidance all plug in here):

    eps_guided = eps - sqrt(1 - abar_t) * sum_k w_k * grad_{z_t} log g_k(z_t, t)

``eps`` is always the noise (backbones convert from their prediction type), and the last DDIM step lands
on alpha-bar = 1: the final latent is the clean x0 prediction. A guidance evaluation (one ``grad_log`` of
one term on one image) is counted apart from denoiser calls: it costs a network's forward and backward.

Every image has its own seed (initial noise and, for eta > 0, DDIM's per-step noise come from a
generator seeded for that image alone), so results do not depend on batching or device placement of
the noise. Schedulers are diffusers' DDIMScheduler, fresh per call (they are stateful).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

from domainfusion_bench.diffusion.backbones import Backbone
from domainfusion_bench.diffusion.conditions import Condition
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.protocol import seed_hash


@dataclass(frozen=True)
class SamplerConfig:
    steps: int = 20  # DDIM steps of a full trajectory; img2img runs the last int(steps * strength)
    guidance_scale: float = 1.0  # classifier-free guidance (1 = off: one denoiser call per step)
    eta: float = 0.0  # 0 = deterministic DDIM
    batch_size: int = 64  # images per denoiser call (does not change results)

    def key(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("batch_size")
        return d


class GuidanceTerm:
    """One term of the guidance sum. Subclasses return grad_{z_t} log g(z_t, t) with ``z_t``'s shape.

    ``create_graph=True`` returns a gradient that is itself differentiable (w.r.t. the term's network
    parameters, and w.r.t. ``z_t``'s own graph if it has one), for losses on the guidance (TGDP's
    consistency term). ``cache_key`` names the term's identity (its weights, target...) for the
    generation cache; a term without one makes its results uncacheable.
    """

    weight: float = 1.0
    cache_key: str | None = None

    def grad_log(self, z_t: torch.Tensor, t: torch.Tensor, cond: Condition, create_graph: bool = False) -> torch.Tensor:
        raise NotImplementedError


class LogDensityGuidance(GuidanceTerm):
    """Gradient by autograd of a per-sample log g: ``log_g(z_t, t, cond) -> [B]``."""

    def __init__(self, log_g: Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor], weight: float = 1.0,
                 cache_key: str | None = None):
        self.log_g, self.weight, self.cache_key = log_g, weight, cache_key

    def grad_log(self, z_t, t, cond, create_graph: bool = False):
        with torch.enable_grad():
            if create_graph and z_t.requires_grad:
                z = z_t.float()  # stay in the caller's graph
            else:
                z = z_t.detach().float().requires_grad_(True)
            value = self.log_g(z, t, cond)
            if value.shape != (len(z),):
                raise DfbenchError(f"log_g must return one value per sample, shape [{len(z)}], got {tuple(value.shape)}")
            (grad,) = torch.autograd.grad(value.sum(), z, create_graph=create_graph)
        return grad


class ClassifierGuidance(LogDensityGuidance):
    """log p(y | z_t, t, cond) from a noise-aware classifier ``classifier(z_t, t, cond) -> logits``; y = the
    condition's class ids (or ``target``, e.g. the "valid" class of a classifier of the judge's labels). The
    classifier gets the condition so its answer may depend on it (validity of a sample *of a class*)."""

    def __init__(self, classifier: Callable, weight: float = 1.0, target: int | None = None, cache_key: str | None = None):
        def log_g(z, t, cond):
            logp = torch.log_softmax(classifier(z, t, cond).float(), dim=1)
            y = cond.class_ids.to(z.device) if target is None else torch.full((len(z),), target, device=z.device)
            return logp.gather(1, y.view(-1, 1).long()).squeeze(1)

        super().__init__(log_g, weight, cache_key)


def guided_eps(eps: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
               terms: Sequence[GuidanceTerm], cond: Condition, create_graph: bool = False) -> torch.Tensor:
    """eps - sqrt(1 - abar_t) * sum_k w_k grad log g_k(z_t, t) (``create_graph``: see GuidanceTerm)."""
    if not terms:
        return eps
    total = torch.zeros_like(eps)
    for term in terms:
        total = total + term.weight * term.grad_log(z_t, t, cond, create_graph=create_graph).to(eps.dtype)
    abar = alphas_cumprod.to(eps.device)[t.long().to(eps.device)].view(-1, *[1] * (eps.dim() - 1))
    return eps - (1 - abar).sqrt() * total


@dataclass
class SampleOutput:
    images: torch.Tensor  # [B, C, H, W] in [0, 1] at the backbone's resolution; CPU unless keep_on_device
    nfe: list[int]  # denoiser evaluations spent on each image (a CFG step costs 2)
    seconds: float  # wall time of the call
    latents: torch.Tensor | None = None  # [B, *latent_shape] final z_0 (the clean prediction); same device as images
    guidance_evals: list[int] | None = None  # guidance-term evaluations per image (steps x terms)


def per_image_noise(seeds: Sequence[int], shape: Sequence[int], salt: int = 0) -> torch.Tensor:
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed((int(s) + salt) % 2**63))
                        for s in seeds])


class DDIMSampler:
    def __init__(self, backbone: Backbone, config: SamplerConfig = SamplerConfig(), guidance: Sequence[GuidanceTerm] = ()):
        self.backbone = backbone
        self.config = config
        self.guidance = list(guidance)

    def key(self, strength: float | None = None) -> dict[str, Any] | None:
        """What identifies this sampler's output for the cache (None: not cacheable)."""
        keys = [g.cache_key for g in self.guidance]
        if any(k is None for k in keys):
            return None
        out = {"sampler": "ddim", **self.config.key(), "guidance": [[k, g.weight] for k, g in zip(keys, self.guidance)]}
        if strength is not None:
            out["strength"] = float(strength)
        return out

    def _scheduler(self, strength: float):
        if not 0.0 <= strength <= 1.0:
            raise DfbenchError(f"img2img strength must be in [0, 1], got {strength}")
        scheduler = self.backbone.inference_scheduler()
        scheduler.set_timesteps(self.config.steps, device=self.backbone.device)
        n = min(int(self.config.steps * strength), self.config.steps)
        return scheduler, scheduler.timesteps[self.config.steps - n:]

    def _eps(self, z: torch.Tensor, t: torch.Tensor, cond: Condition, null: Condition | None) -> torch.Tensor:
        s = self.config.guidance_scale
        if null is None:
            return self.backbone.eps(z, t, cond)
        eps_null, eps_cond = self.backbone.eps(torch.cat([z, z]), t.repeat(2), Condition.cat([null, cond])).chunk(2)
        return eps_null + s * (eps_cond - eps_null)

    @torch.no_grad()
    def denoise(self, z: torch.Tensor, cond: Condition, scheduler, timesteps, seeds: Sequence[int]) -> tuple[torch.Tensor, int]:
        """Run DDIM from ``z`` at ``timesteps[0]`` to t=0. Returns (z_0, NFEs per image); guidance-term
        evaluations per image are ``len(timesteps) * len(self.guidance)``."""
        cfg = self.config.guidance_scale != 1.0
        null = None
        if cfg:
            null = self.backbone.null_condition(len(z))
            if cond.extra is not None:
                null.extra = torch.zeros_like(cond.extra)
        # eta > 0 adds noise every step: its own stream per image, apart from every image's starting noise
        generators = ([torch.Generator().manual_seed(seed_hash(int(s), "ddim-eta")) for s in seeds]
                      if self.config.eta > 0 else None)
        abar = self.backbone.alphas_cumprod
        nfe = 0
        for t in timesteps:
            tb = t.expand(len(z)).to(self.backbone.device)
            eps = self._eps(z, tb, cond, null)
            eps = guided_eps(eps, z, tb, abar, self.guidance, cond)
            nfe += 2 if cfg else 1
            kw = {}
            if generators is not None:
                kw["variance_noise"] = torch.stack([torch.randn(z.shape[1:], generator=g) for g in generators]).to(z.device)
            z = scheduler.step(eps, t, z, eta=self.config.eta, **kw).prev_sample
        return z, nfe

    def _batches(self, n: int):
        b = max(1, self.config.batch_size)
        for start in range(0, n, b):
            yield torch.arange(start, min(n, start + b))

    def _output(self, images, latents, nfes, steps: int, start: float, keep_on_device: bool) -> SampleOutput:
        place = (lambda t: t) if keep_on_device else (lambda t: t.cpu())
        return SampleOutput(place(torch.cat(images)), nfes, time.perf_counter() - start,
                            latents=place(torch.cat(latents)), guidance_evals=[steps * len(self.guidance)] * len(nfes))

    def sample(self, cond: Condition, seeds: Sequence[int], keep_on_device: bool = False) -> SampleOutput:
        """Full trajectories from per-image Gaussian noise under ``cond`` (``keep_on_device``: images and
        latents stay on the backbone's device)."""
        if len(seeds) != len(cond):
            raise DfbenchError(f"{len(seeds)} seeds for {len(cond)} conditions")
        start = time.perf_counter()
        images, latents, nfes = [], [], []
        steps = 0
        for idx in self._batches(len(cond)):
            scheduler, timesteps = self._scheduler(1.0)
            sub_seeds = [seeds[i] for i in idx.tolist()]
            z = per_image_noise(sub_seeds, self.backbone.latent_shape()).to(self.backbone.device)
            z = z * scheduler.init_noise_sigma
            z, nfe = self.denoise(z, cond.select(idx), scheduler, timesteps, sub_seeds)
            steps = len(timesteps)
            with torch.no_grad():
                images.append(self.backbone.decode(z))
            latents.append(z)
            nfes += [nfe] * len(idx)
        return self._output(images, latents, nfes, steps, start, keep_on_device)

    def img2img(self, images: torch.Tensor, cond: Condition, strength: float, seeds: Sequence[int],
                source_domains: Sequence[int] | int, keep_on_device: bool = False) -> SampleOutput:
        """Noise ``images`` (in [0, 1]) to ``strength`` of the trajectory, then denoise under ``cond``.

        ``source_domains`` (required) says which domain each image comes from: the leakage guard
        refuses held-out ones. Strength 0 returns the input unchanged at zero cost (latents: its encoding).
        """
        n = len(images)
        if len(seeds) != n or len(cond) != n:
            raise DfbenchError(f"img2img got {n} images, {len(cond)} conditions and {len(seeds)} seeds")
        domains = [source_domains] * n if isinstance(source_domains, int) else list(source_domains)
        self.backbone.guard.check_sources(domains)
        start = time.perf_counter()
        scheduler, timesteps = self._scheduler(strength)
        if len(timesteps) == 0:
            with torch.no_grad():
                z0 = self.backbone.encode(images.to(self.backbone.device)).detach()
            kept = images.detach().clone()
            return self._output([kept.to(self.backbone.device) if keep_on_device else kept.cpu()], [z0], [0] * n, 0,
                                start, keep_on_device)
        out, latents, nfes = [], [], []
        for idx in self._batches(n):
            scheduler, timesteps = self._scheduler(strength)
            sub_seeds = [seeds[i] for i in idx.tolist()]
            with torch.no_grad():
                z0 = self.backbone.encode(images[idx].to(self.backbone.device))
            noise = per_image_noise(sub_seeds, z0.shape[1:]).to(z0.device)
            z = scheduler.add_noise(z0, noise, timesteps[:1].repeat(len(idx)))
            z, nfe = self.denoise(z, cond.select(idx), scheduler, timesteps, sub_seeds)
            with torch.no_grad():
                out.append(self.backbone.decode(z))
            latents.append(z)
            nfes += [nfe] * len(idx)
        return self._output(out, latents, nfes, len(timesteps), start, keep_on_device)
