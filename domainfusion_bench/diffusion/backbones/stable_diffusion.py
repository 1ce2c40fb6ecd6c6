"""Stable Diffusion (any diffusers SD-1.x/2.x layout: local directory or hub id) as a latent backbone."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch

from domainfusion_bench.diffusion.backbones.base import BACKBONES, Backbone, parameters_digest, resize
from domainfusion_bench.diffusion.conditions import Condition, class_phrase, domain_description
from domainfusion_bench.errors import DfbenchError


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
