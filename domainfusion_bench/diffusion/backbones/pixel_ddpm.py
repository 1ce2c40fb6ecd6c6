"""Pixel-space class- and domain-conditioned DDPM (the harness trains it itself): its config, the
condition embedding, the diffusers UNet2DModel around it and the backbone with its diffusers-style folder."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from domainfusion_bench.diffusion.backbones.base import BACKBONES, Backbone, resize
from domainfusion_bench.errors import DfbenchError


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
