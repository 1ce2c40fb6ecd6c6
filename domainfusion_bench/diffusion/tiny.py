"""Tiny, randomly initialised Stable Diffusion components built from configs, offline.

For tests and for exercising the latent/text code path without a checkpoint (``sd:tiny``). The
tokenizer is a real ``transformers.CLIPTokenizer`` over a hand-made character vocabulary (no merges),
written to disk, so everything loads back through the same ``from_pretrained`` path as a real
checkpoint. The images such a model makes are noise: it is a plumbing test, not a generator.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

from domainfusion_bench.errors import DfbenchError

MAX_LENGTH = 16


def write_char_tokenizer(path: Path) -> None:
    """vocab.json + merges.txt for a CLIPTokenizer whose tokens are single characters."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ".,'-%")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")


def tiny_components(seed: int = 0, tokenizer_dir: Path | None = None) -> dict:
    """unet, vae, text_encoder, tokenizer, scheduler: a 16 px image <-> 8x8x4 latent toy SD."""
    try:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    except ImportError as err:
        raise DfbenchError(f"tiny Stable Diffusion needs transformers ({err}); pip install transformers") from None
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer_dir = Path(tokenizer_dir or tempfile.mkdtemp(prefix="dfbench_tok_"))
    write_char_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), model_max_length=MAX_LENGTH)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=32,
    )
    text_encoder = CLIPTextModel(text_config)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=16,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def save_tiny_stable_diffusion(path: Path, seed: int = 0) -> Path:
    """Write a diffusers-layout folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    path = Path(path)
    parts = tiny_components(seed, tokenizer_dir=path / "tokenizer")
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        parts[name].save_pretrained(path / name)
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0"}))
    return path


class _Target(torch.nn.Module):
    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.register_buffer("target", target.float().clone())


def exact_backbone(target: torch.Tensor | None, prediction_type: str = "epsilon", *, shape=(3, 8, 8),
                   dataset: str = "PACS", domains=("art_painting", "cartoon", "photo", "sketch"), classes=("a", "b", "c"),
                   num_train_timesteps: int = 1000):
    """A backbone that *is* the optimal denoiser of a known data distribution, for analytic tests:

    - ``target`` a [C, H, W] latent: the one-image dataset x0 = target, so the noise prediction on
      ``add_noise(target, n, t)`` is exactly ``n`` and DDIM from it must end at ``target``;
    - ``target`` None: data x0 ~ N(0, I) of ``shape``, where E[eps | z_t] = sqrt(1 - abar) z_t (a
      distribution that guidance can visibly reshape).

    Images are ``(z + 1) / 2``. It outputs what ``prediction_type`` (epsilon | v_prediction | sample) says,
    so it checks the conversions to eps too. No x0 clipping in its scheduler."""
    from diffusers import DDPMScheduler

    from domainfusion_bench.diffusion.backbones import Backbone

    class ExactBackbone(Backbone):
        kind = "exact"

        def __init__(self):
            scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, prediction_type=prediction_type,
                                      clip_sample=False)
            size = tuple(shape if target is None else target.shape)
            super().__init__(dataset=dataset, domains=domains, classes=classes, image_channels=size[0],
                             resolution=size[-1], scheduler=scheduler,
                             key=f"exact-{'gaussian' if target is None else 'point'}-{prediction_type}")
            self.net = _Target(torch.zeros(size) if target is None else target)
            self.gaussian = target is None

        def modules(self):
            return {"net": self.net}

        def latent_shape(self):
            return tuple(self.net.target.shape)

        def encode(self, x):
            return x.to(self.device).float() * 2 - 1

        def decode(self, z):
            return ((z.float() + 1) / 2).clamp(0, 1)

        def _predict(self, z_t, t, cond):
            abar = self.abar(t, z_t.dim())
            if self.gaussian:
                eps = (1 - abar).sqrt() * z_t.float()
                x0 = abar.sqrt() * z_t.float()
            else:
                x0 = self.net.target.expand_as(z_t)
                eps = (z_t.float() - abar.sqrt() * x0) / (1 - abar).sqrt()
            return {"epsilon": eps, "sample": x0, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[prediction_type]

    return ExactBackbone().eval()
