"""Pre-training DiTi's encoder and shift branch against a frozen backbone."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch

from domainfusion_bench.diffusion.backbones import Backbone
from domainfusion_bench.diffusion.diti.networks import DiTiEncoder, DiTiModel, ShiftBranch
from domainfusion_bench.diffusion.diti.objective import DiTiConfig, DiTiObjective, as_unit, evaluate_loss
from domainfusion_bench.diffusion.fitting import fit, tail_mean
from domainfusion_bench.errors import DfbenchError


def build_model(backbone: Backbone, config: DiTiConfig, image_channels: int, encoder_res: int) -> DiTiModel:
    return DiTiModel(DiTiEncoder(image_channels, config.z_dim, config.encoder_width, encoder_res),
                     ShiftBranch(backbone.latent_shape(), config.z_dim, config.branch_width))


def encoder_resolution(input_shape: Sequence[int]) -> int:
    """32 px for MNIST-sized inputs, 64 px otherwise (the encoder is a small conv net either way)."""
    return 32 if int(input_shape[-1]) <= 32 else 64


def pretrain_diti(backbone: Backbone, images: torch.Tensor, config: DiTiConfig, device: str | torch.device = "cpu",
                  progress: bool = True, encoder_res: int | None = None, desc: str = "DiTi encoder",
                  heartbeat: Callable[[], None] | None = None,
                  model: DiTiModel | None = None) -> tuple[DiTiEncoder, ShiftBranch, dict[str, Any]]:
    """Train an encoder and shift branch against the frozen ``backbone`` on ``images`` ([N, C, H, W], uint8 or in [0, 1]:
    the training domains' in-splits only); ``model`` (a fresh ``build_model``) is trained in place when given.
    Returns the EMA encoder and branch (eval mode) and an info dict (train_seconds, final_loss, eval_loss
    vs eval_frozen_loss on a fixed draw, end_dims, z_mean and z_std over ``images``). The backbone is never
    updated; the caller's random streams are left untouched."""
    from diffusers.training_utils import EMAModel

    if images.dim() != 4 or len(images) == 0:
        raise DfbenchError(f"DiTi pre-training needs a non-empty [N, C, H, W] image tensor, got {tuple(images.shape)}")
    device = torch.device(device)
    backbone.eval()
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(config.seed)
        if model is None:
            model = build_model(backbone, config, images.shape[1], encoder_res or encoder_resolution(images.shape))
        encoder, branch = model.encoder, model.branch
        objective = DiTiObjective(backbone, config).to(device)
        encoder.to(device).train(), branch.to(device).train()
        params = list(encoder.parameters()) + list(branch.parameters())
        optimizer = torch.optim.Adam(params, lr=config.lr)
        ema = EMAModel(params, decay=config.ema_decay)
        g = torch.Generator().manual_seed(config.seed + 1)

        def loss_fn(step: int) -> torch.Tensor:
            idx = torch.randint(len(images), (config.batch_size,), generator=g)
            return objective.loss(encoder, branch, as_unit(images[idx].to(device)), generator=g)[0]

        start = time.perf_counter()
        losses = fit(params, loss_fn, steps=config.steps, optimizer=optimizer, ema=ema, heartbeat=heartbeat,
                     progress=progress, desc=desc)
        if config.steps:
            ema.copy_to(params)
        encoder.eval(), branch.eval()
        seconds = time.perf_counter() - start
        held = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(7))[:256]]
        eval_loss, eval_frozen = evaluate_loss(objective, encoder, branch, held)
        with torch.no_grad():
            z = torch.cat([encoder(as_unit(images[i:i + 256].to(device))).float().cpu() for i in range(0, len(images), 256)])
    info = {"train_seconds": seconds, "final_loss": tail_mean(losses), "eval_loss": eval_loss,
            "eval_frozen_loss": eval_frozen, "steps": config.steps, "n_images": len(images),
            "end_dims": objective.end_dims, "stage_edges": objective.stage_edges, "config": config.to_json(), "device": str(device),
            "z_mean": z.mean(0).tolist(), "z_std": z.std(0).nan_to_num(1.0).clamp(min=1e-6).tolist()}
    return encoder.requires_grad_(False), branch.requires_grad_(False), info
