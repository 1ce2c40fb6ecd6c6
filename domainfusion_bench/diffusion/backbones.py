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

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from domainfusion_bench.diffusion.conditions import (
    Condition,
    LeakageGuard,
    class_phrase,
    domain_description,
    domain_weights,
)
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.registry import Registry

BACKBONES: Registry[type["Backbone"]] = Registry("diffusion backbone")


def resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def parameters_digest(*modules: nn.Module) -> str:
    """Content hash of modules' parameters and buffers (for small models built in memory)."""
    h = hashlib.sha256()
    for module in modules:
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Backbone:
    """Base class; subclasses implement ``encode``, ``decode``, ``_predict`` (the network's raw output,
    of type ``prediction_type``) and ``_embed``."""

    kind = "backbone"

    def __init__(self, *, dataset: str, domains: Sequence[str], classes: Sequence[str], image_channels: int,
                 resolution: int, scheduler, key: str, seen_domains=(), info: dict[str, Any] | None = None):
        from diffusers import DDPMScheduler

        self.dataset = dataset
        self.domains = list(domains)
        self.classes = list(classes)
        self.image_channels = image_channels
        self.resolution = resolution
        self.train_scheduler = scheduler if isinstance(scheduler, DDPMScheduler) else DDPMScheduler.from_config(scheduler.config)
        self.key = key
        self.seen_domains = frozenset(int(d) for d in seen_domains)
        self.info = dict(info or {})
        self.guard = LeakageGuard(dataset, self.domains)
        self.device = torch.device("cpu")

    # --- the noise schedule -------------------------------------------------------------------
    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha-bar_t for t = 0..T-1 (float32, on the backbone's device)."""
        return self.train_scheduler.alphas_cumprod.to(self.device, torch.float32)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.train_scheduler.config.num_train_timesteps)

    def abar(self, t: torch.Tensor | int, dims: int | None = None) -> torch.Tensor:
        """alpha-bar at timesteps ``t`` (an int or [B]) as [B, 1, ..., 1] with ``dims`` dimensions in all
        (default: a latent batch's, 1 + len(latent_shape())), on the backbone's device."""
        t = torch.as_tensor(t, device=self.device).long().reshape(-1)
        dims = 1 + len(self.latent_shape()) if dims is None else dims
        return self.alphas_cumprod[t].view(-1, *[1] * (dims - 1))

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.abar(t, z0.dim())
        return abar.sqrt() * z0 + (1 - abar).sqrt() * noise

    def x0_from_eps(self, z_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        abar = self.abar(t, z_t.dim())
        return (z_t.float() - (1 - abar).sqrt() * eps) / abar.sqrt()

    def eps_from_x0(self, z_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        abar = self.abar(t, z_t.dim())
        return (z_t.float() - abar.sqrt() * x0) / (1 - abar).sqrt()

    def eps_from_v(self, z_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        # v = sqrt(abar) eps - sqrt(1 - abar) x0 and z_t = sqrt(abar) x0 + sqrt(1 - abar) eps
        abar = self.abar(t, z_t.dim())
        return abar.sqrt() * v + (1 - abar).sqrt() * z_t.float()

    @property
    def prediction_type(self) -> str:
        """What the network outputs, in diffusers' terms: epsilon | v_prediction | sample."""
        return str(self.train_scheduler.config.get("prediction_type", "epsilon"))

    def to_eps(self, out: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The one place a network's raw output becomes the noise."""
        kind = self.prediction_type
        if kind == "epsilon":
            return out
        if kind == "sample":
            return self.eps_from_x0(z_t, out, t)
        if kind == "v_prediction":
            return self.eps_from_v(z_t, out, t)
        raise DfbenchError(f"{self.kind} backbone: unknown prediction_type {kind!r} (epsilon, v_prediction or sample)")

    def inference_scheduler(self):
        """A fresh DDIM scheduler on this backbone's noise schedule (schedulers are stateful). It is told
        ``prediction_type="epsilon"`` because samplers hand it ``eps`` (already converted)."""
        from diffusers import DDIMScheduler

        # set_alpha_to_one: the last step lands on alpha-bar 1, so the final latent is the clean x0 prediction
        return DDIMScheduler.from_config(self.train_scheduler.config, **{**self.ddim_overrides(),
                                                                         "prediction_type": "epsilon",
                                                                         "set_alpha_to_one": True})

    def ddim_overrides(self) -> dict[str, Any]:
        return {}

    # --- leakage guard --------------------------------------------------------------------------
    def restrict(self, held_out, allow_condition: bool = False, few_shot_target: int = 0) -> "Backbone":
        """Install a run's guard: held-out domains may never be conditioned on (unless oracle) or started from
        (``few_shot_target``: see ``LeakageGuard``)."""
        guard = LeakageGuard(self.dataset, self.domains, held_out, allow_condition, few_shot_target)
        guard.check_seen(self.seen_domains, f"the {self.kind} backbone {self.key[:12]}")
        self.guard = guard
        return self

    # --- conditioning ---------------------------------------------------------------------------
    def condition(self, class_ids=None, domains=None, prompts: Sequence[str] | None = None,
                  extra: torch.Tensor | None = None, batch: int | None = None) -> Condition:
        """Build a checked condition. ``class_ids``: ints (-1 = none) or None; ``domains``: see
        ``conditions.domain_weights`` (an id, ids, a [B, D] weight tensor or {domain: weight} dicts)."""
        if class_ids is None:
            n = batch if batch is not None else (len(prompts) if prompts is not None else len(domains))
            class_ids = torch.full((n,), -1, dtype=torch.long)
        class_ids = torch.as_tensor(class_ids, dtype=torch.long).flatten().cpu()
        n = len(class_ids)
        if ((class_ids < -1) | (class_ids >= len(self.classes))).any():
            raise DfbenchError(f"class ids must be in -1..{len(self.classes) - 1}, got {class_ids.tolist()}")
        weights = domain_weights(domains, n, len(self.domains))
        self.guard.check_condition(weights)
        if prompts is not None:
            if len(prompts) != n:
                raise DfbenchError(f"got {len(prompts)} prompts for a batch of {n}")
            self.guard.check_text(prompts, "a prompt")
        if extra is not None and (extra.dim() != 2 or len(extra) != n):
            raise DfbenchError(f"extra condition must be [batch, features] = [{n}, E], got {tuple(extra.shape)}")
        # extra stays in the autograd graph (a trainable encoder may produce it); .to() below keeps the graph
        cond = Condition(class_ids, weights, list(prompts) if prompts is not None else None,
                         extra=None if extra is None else extra.float())
        return self._embed(cond).to(self.device)

    def null_condition(self, n: int) -> Condition:
        return self.condition(torch.full((n,), -1, dtype=torch.long), None,
                              prompts=[""] * n if self.uses_prompts else None)

    uses_prompts = False

    def _embed(self, cond: Condition) -> Condition:
        return cond

    # --- the model ------------------------------------------------------------------------------
    def latent_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def eps(self, z_t: torch.Tensor, t: torch.Tensor | int, cond: Condition) -> torch.Tensor:
        """The predicted noise at ``z_t`` (float32), whatever the network's prediction type."""
        t = torch.as_tensor(t, device=z_t.device)
        if t.dim() == 0:
            t = t.expand(len(z_t))
        return self.to_eps(self._predict(z_t, t, cond).float(), z_t, t)

    def _predict(self, z_t, t, cond) -> torch.Tensor:
        raise NotImplementedError

    def modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def to(self, device) -> "Backbone":
        self.device = torch.device(device)
        for m in self.modules().values():
            m.to(self.device)
        return self

    def eval(self, freeze: bool = True, trainable_extra: bool = False) -> "Backbone":
        """Eval mode; ``freeze`` turns off the backbone's own parameters' gradients (inputs such as ``z_t``,
        images given to ``encode`` and ``Condition.extra`` still get theirs). ``trainable_extra`` keeps the
        extra-condition projection (``extra_parameters()``) trainable, e.g. for DiTi's feature conditioning."""
        for m in self.modules().values():
            m.eval()
            if freeze:
                m.requires_grad_(False)
        if trainable_extra:
            for p in self.extra_parameters():
                p.requires_grad_(True)
        return self

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters that map ``Condition.extra`` into the model (none if it takes no extra)."""
        return []

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "dataset": self.dataset,
                "seen_domains": [self.domains[d] for d in sorted(self.seen_domains)], **self.info}


# ------------------------------------------------------------------------------------------------
# Pixel-space class- and domain-conditioned DDPM (the harness trains it itself)
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PixelDDPMConfig:
    """Architecture and noise schedule of the small pixel DDPM (a diffusers UNet2DModel)."""

    resolution: int = 32
    # 2: the UNet works on 2x2 pixel patches folded into channels (pixel_unshuffle), a quarter of the
    # positions at full resolution: ~4x cheaper on a CPU with no loss of resolution (DiT's patch idea)
    patch_size: int = 1
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    attention: bool = False  # self-attention at the lowest resolution
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    # cosine (Nichol & Dhariwal 2021): at 32 px the linear schedule leaves so little signal by mid-trajectory
    # (abar_500 = 0.08) that a briefly trained model never learns colour: its samples and img2img outputs
    # come out grey. With the cosine schedule (abar_500 = 0.5) the same model learns each domain's colours
    # and textures (DigitStyles, 1500 steps: datasets/digitstyles_ddpm_samples.png).
    beta_schedule: str = "squaredcos_cap_v2"
    # what the network outputs: "epsilon" (the noise) or "sample" (the clean image x0). A briefly trained
    # x0-model denoises to smooth images in a few DDIM steps where an eps-model leaves grain; either way
    # the backbone's ``eps`` returns the noise, which is what samplers and guidance use.
    prediction: str = "sample"
    extra_dim: int = 0  # >0: an extra conditioning vector of this size is projected and added (e.g. DiTi)

    def __post_init__(self):
        side = self.patch_size * 2 ** (len(self.block_out_channels) - 1)
        if self.prediction not in ("epsilon", "sample"):
            raise DfbenchError(f"pixel DDPM prediction must be 'epsilon' or 'sample', got {self.prediction!r}")
        if self.patch_size < 1 or self.resolution % side:
            raise DfbenchError(
                f"pixel DDPM resolution {self.resolution} must be divisible by patch_size x 2^(levels-1) = {side} "
                f"(patch_size {self.patch_size}, {len(self.block_out_channels)} levels)"
            )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "PixelDDPMConfig":
        d = dict(d)
        d["block_out_channels"] = tuple(d["block_out_channels"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class ConditionEmbedding(nn.Module):
    """class embedding + (weighted) domain embedding [+ projected extra], added to the time embedding.

    The last row of each table is the "none" token used for classifier-free guidance; a domain row of
    weights w gets ``w @ E_domains + (1 - sum w) * E_none``, so mixes interpolate between domains.
    """

    def __init__(self, num_classes: int, num_domains: int, dim: int, extra_dim: int = 0):
        super().__init__()
        self.num_classes, self.num_domains = num_classes, num_domains
        self.classes = nn.Embedding(num_classes + 1, dim)
        self.domains = nn.Embedding(num_domains + 1, dim)
        self.extra = nn.Linear(extra_dim, dim) if extra_dim else None

    def forward(self, class_ids: torch.Tensor, weights: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        ids = torch.where(class_ids < 0, torch.full_like(class_ids, self.num_classes), class_ids)
        weights = weights.to(self.domains.weight.dtype)
        none = (1 - weights.sum(1, keepdim=True)).clamp(min=0)
        out = self.classes(ids) + weights @ self.domains.weight[:-1] + none * self.domains.weight[-1]
        if extra is not None:
            if self.extra is None:
                raise DfbenchError("this pixel DDPM was built without extra_dim; it cannot take an extra condition")
            out = out + self.extra(extra.to(out.dtype))
        return out


class PixelDDPM(nn.Module):
    """diffusers UNet2DModel whose class embedding is our ConditionEmbedding (class_embed_type='identity')."""

    def __init__(self, config: PixelDDPMConfig, channels: int, num_classes: int, num_domains: int, unet=None):
        super().__init__()
        from diffusers import UNet2DModel

        n = len(config.block_out_channels)
        down = ["DownBlock2D"] * n
        up = ["UpBlock2D"] * n
        if config.attention:
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        self.patch = config.patch_size
        folded = channels * self.patch**2
        self.unet = unet or UNet2DModel(
            sample_size=config.resolution // self.patch, in_channels=folded, out_channels=folded,
            block_out_channels=tuple(config.block_out_channels), layers_per_block=config.layers_per_block,
            down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=config.norm_num_groups,
            class_embed_type="identity",
        )
        dim = config.block_out_channels[0] * 4  # UNet2DModel's time embedding size
        self.cond = ConditionEmbedding(num_classes, num_domains, dim, config.extra_dim)

    def forward(self, z_t, t, class_ids, weights, extra=None) -> torch.Tensor:
        emb = self.cond(class_ids, weights, extra)
        if self.patch == 1:
            return self.unet(z_t, t, class_labels=emb).sample
        folded = F.pixel_unshuffle(z_t, self.patch)
        return F.pixel_shuffle(self.unet(folded, t, class_labels=emb).sample, self.patch)


@BACKBONES.register("pixel_ddpm")
class PixelDDPMBackbone(Backbone):
    """Small class- and domain-conditioned pixel DDPM, trained by ``trainer.train_pixel_ddpm``."""

    kind = "pixel_ddpm"
    META = "backbone.json"

    def __init__(self, model: PixelDDPM, config: PixelDDPMConfig, scheduler, **kw):
        super().__init__(resolution=config.resolution, scheduler=scheduler, **kw)
        self.model = model
        self.config = config

    @classmethod
    def create(cls, config: PixelDDPMConfig, *, dataset: str, domains, classes, image_channels: int,
               seen_domains=(), key: str = "untrained", info=None) -> "PixelDDPMBackbone":
        from diffusers import DDPMScheduler

        model = PixelDDPM(config, image_channels, len(classes), len(domains))
        scheduler = DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule)
        return cls(model, config, scheduler, dataset=dataset, domains=domains, classes=classes,
                   image_channels=image_channels, key=key, seen_domains=seen_domains, info=info)

    def modules(self):
        return {"model": self.model}

    def latent_shape(self):
        return (self.image_channels, self.resolution, self.resolution)

    def encode(self, x):
        if x.shape[1] != self.image_channels:
            raise DfbenchError(f"pixel DDPM takes {self.image_channels}-channel images, got {x.shape[1]}")
        return resize(x.to(self.device).float(), self.resolution) * 2 - 1

    def decode(self, z):
        return ((z.float() + 1) / 2).clamp(0, 1)

    @property
    def prediction_type(self) -> str:
        return self.config.prediction

    def extra_parameters(self):
        return [] if self.model.cond.extra is None else list(self.model.cond.extra.parameters())

    def _predict(self, z_t, t, cond):
        return self.model(z_t, t, cond.class_ids, cond.domain_weights, cond.extra)

    # --- persistence: a diffusers-style folder -------------------------------------------------
    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.unet.save_pretrained(path / "unet")
        self.train_scheduler.save_pretrained(path / "scheduler")
        save_file({k: v.contiguous() for k, v in self.model.cond.state_dict().items()}, str(path / "condition.safetensors"))
        meta = {"kind": self.kind, "key": self.key, "config": self.config.to_json(), "dataset": self.dataset,
                "domains": self.domains, "classes": self.classes, "image_channels": self.image_channels,
                "seen_domains": sorted(self.seen_domains), "info": self.info}
        (path / self.META).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: Path, device="cpu") -> "PixelDDPMBackbone":
        from diffusers import DDPMScheduler, UNet2DModel
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads((path / cls.META).read_text())
        config = PixelDDPMConfig.from_json(meta["config"])
        unet = UNet2DModel.from_pretrained(path / "unet")
        model = PixelDDPM(config, meta["image_channels"], len(meta["classes"]), len(meta["domains"]), unet=unet)
        model.cond.load_state_dict(load_file(str(path / "condition.safetensors")))
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
        backbone = cls(model, config, scheduler, dataset=meta["dataset"], domains=meta["domains"],
                       classes=meta["classes"], image_channels=meta["image_channels"], key=meta["key"],
                       seen_domains=meta["seen_domains"], info=meta["info"])
        return backbone.to(device).eval()


# ------------------------------------------------------------------------------------------------
# Stable Diffusion (any diffusers SD-1.x/2.x layout: local directory or hub id)
# ------------------------------------------------------------------------------------------------

@BACKBONES.register("stable_diffusion")
class StableDiffusionBackbone(Backbone):
    """Latent text-to-image model: VAE + UNet2DConditionModel + CLIP text encoder/tokenizer.

    Prompts come from the dataset's tables: ``template.format(cls=<class phrase>, desc=<domain
    description>)``; a mix of domains mixes the prompts' text-encoder states with the same weights.
    """

    kind = "stable_diffusion"
    uses_prompts = True
    TEMPLATE = "a {cls}, {desc}"

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, *, resolution: int | None = None,
                 template: str | None = None, dtype: torch.dtype = torch.float32, **kw):
        vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        resolution = resolution or unet.config.sample_size * vae_scale
        super().__init__(resolution=resolution, scheduler=scheduler, **kw)
        if self.image_channels not in (1, 3):
            raise DfbenchError(f"Stable Diffusion takes RGB or grey images; {self.dataset} has {self.image_channels} channels")
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.vae_scale = vae_scale
        self.template = template or self.TEMPLATE
        self.dtype = dtype
        self._text_cache: dict[str, torch.Tensor] = {}
        for m in self.modules().values():
            m.to(dtype)
        self.eval()

    # SD's DDIM timesteps are 1 + multiples of T/steps (steps_offset 1, as its pipelines use). The last step
    # goes to alpha-bar 1 (set_alpha_to_one): the final latent is the clean x0 prediction, not x0 re-noised
    # to alpha-bar_0 as SD's own scheduler config would leave it.
    NUMERICS = 2  # part of the key: bump when what the same weights generate changes (2: eps conversion, final x0)

    def ddim_overrides(self):
        return {"clip_sample": False, "steps_offset": 1}

    @classmethod
    def from_pretrained(cls, source: str, *, dataset: str, domains, classes, image_channels: int,
                        revision: str | None = None, dtype: torch.dtype = torch.float32, resolution: int | None = None,
                        template: str | None = None) -> "StableDiffusionBackbone":
        """Load the components of a diffusers Stable Diffusion checkpoint (folder or hub id)."""
        try:
            from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError as err:
            raise DfbenchError(f"the Stable Diffusion backbone needs transformers ({err}); pip install transformers") from None
        try:
            kw = {"revision": revision} if revision else {}
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kw)
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kw)
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw)
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
            scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw)
        except (OSError, ValueError) as err:
            raise DfbenchError(
                f"cannot load a Stable Diffusion checkpoint from {source!r} ({type(err).__name__}: {str(err)[:200]}). "
                "Give a local diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a hub id "
                "that is in the local Hugging Face cache when offline."
            ) from None
        local = Path(source)
        ident = {"source": str(local.resolve()) if local.exists() else source, "revision": revision,
                 "dtype": str(dtype), "resolution": resolution, "template": template, "numerics": cls.NUMERICS}
        if local.exists():  # a folder's content may change: key on its config files and weight sizes/mtimes
            ident["files"] = sorted((str(p.relative_to(local)), p.stat().st_size, int(p.stat().st_mtime))
                                    for p in local.rglob("*") if p.is_file())
        key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        return cls(unet, vae, text_encoder, tokenizer, scheduler, dataset=dataset, domains=domains, classes=classes,
                   image_channels=image_channels, key=key, resolution=resolution, template=template, dtype=dtype,
                   info={"source": source})

    @classmethod
    def from_components(cls, unet, vae, text_encoder, tokenizer, scheduler, **kw) -> "StableDiffusionBackbone":
        """From in-memory components (tests, tiny models); the key is a hash of their weights."""
        key = hashlib.sha256(f"{parameters_digest(unet, vae, text_encoder)}|numerics={cls.NUMERICS}".encode()).hexdigest()
        return cls(unet, vae, text_encoder, tokenizer, scheduler, key=key, **kw)

    def modules(self):
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    def latent_shape(self):
        side = self.resolution // self.vae_scale
        return (self.unet.config.in_channels, side, side)

    def encode(self, x):
        x = x.to(self.device).float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = resize(x, self.resolution) * 2 - 1
        z = self.vae.encode(x.to(self.dtype)).latent_dist.mean
        return z.float() * self.vae.config.scaling_factor

    def decode(self, z):
        x = self.vae.decode((z / self.vae.config.scaling_factor).to(self.dtype)).sample.float()
        x = ((x + 1) / 2).clamp(0, 1)
        return x.mean(1, keepdim=True) if self.image_channels == 1 else x

    def prompt(self, class_id: int, domain: int | None) -> str:
        cls_text = class_phrase(self.dataset, self.classes[class_id]) if class_id >= 0 else None
        desc = domain_description(self.dataset, self.domains[domain]) if domain is not None else None
        if cls_text and desc:
            return self.template.format(cls=cls_text, desc=desc)
        if cls_text:
            return f"a {cls_text}"
        return desc or ""

    @torch.no_grad()
    def text_states(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = sorted({p for p in prompts if p not in self._text_cache})
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
            states = self.text_encoder(ids)[0].float()
            for p, s in zip(missing, states):
                self._text_cache[p] = s
        return torch.stack([self._text_cache[p].to(self.device) for p in prompts])

    def _embed(self, cond: Condition) -> Condition:
        if cond.prompts is not None:
            cond.embedding = self.text_states(cond.prompts)
            return cond
        rows, prompts = [], []
        for i in range(len(cond)):
            y = int(cond.class_ids[i])
            w = cond.domain_weights[i]
            parts = [(float(w[d]), self.prompt(y, d)) for d in (w > 0).nonzero().flatten().tolist()]
            rest = 1.0 - sum(a for a, _ in parts)
            if rest > 1e-6:
                parts.append((rest, self.prompt(y, None)))
            states = self.text_states([p for _, p in parts])
            weights = torch.tensor([a for a, _ in parts], device=states.device).view(-1, 1, 1)
            rows.append((weights * states).sum(0))
            prompts.append(" | ".join(f"{a:.3g}*{p!r}" if len(parts) > 1 else p for a, p in parts))
        cond.embedding = torch.stack(rows)
        cond.meta["prompts"] = prompts
        return cond

    def _predict(self, z_t, t, cond):
        if cond.embedding is None:
            raise DfbenchError("a Stable Diffusion condition needs text states: build it with backbone.condition(...)")
        return self.unet(z_t.to(self.dtype), t, encoder_hidden_states=cond.embedding.to(self.dtype)).sample


@dataclass
class BackboneSpec:
    """Parsed ``diffusion_backbone``-style strings: ``pixel_ddpm``, ``sd:<folder or hub id>``, ``sd:tiny``."""

    kind: str
    source: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "BackboneSpec":
        name, _, rest = text.partition(":")
        if name in ("pixel_ddpm", "ddpm"):
            return cls("pixel_ddpm")
        if name in ("sd", "stable_diffusion"):
            if not rest:
                raise DfbenchError("stable diffusion backbone needs a source: sd:<local folder or hub id> (or sd:tiny)")
            return cls("stable_diffusion", rest)
        raise DfbenchError(f"unknown diffusion backbone {text!r}. Choices: pixel_ddpm, sd:<folder or hub id>, sd:tiny")
