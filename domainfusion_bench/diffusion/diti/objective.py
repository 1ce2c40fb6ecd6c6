"""The DiTi objective against a frozen backbone, its config, and its evaluation on a fixed draw."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from domainfusion_bench.diffusion.backbones import Backbone
from domainfusion_bench.diffusion.diti.schedule import (
    ALLOCATIONS,
    GRAD_MODES,
    block_end_dims,
    block_index,
    loss_weight,
    prefix_masks,
    shift_coefficient,
    stage_edges,
)
from domainfusion_bench.errors import DfbenchError


@dataclass(frozen=True)
class DiTiConfig:
    z_dim: int = 512
    k: int = 64
    allocation: str = "stages"  # stages (the paper's) | uniform (d / k per block: the ablation)
    grad_mode: str = "base"  # base | stop_grad | dual
    encoder_width: int = 32
    branch_width: int = 32
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    ema_decay: float = 0.99
    snr_gamma: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.grad_mode not in GRAD_MODES:
            raise DfbenchError(f"DiTi grad_mode must be one of {', '.join(GRAD_MODES)}, got {self.grad_mode!r}")
        if self.allocation not in ALLOCATIONS:
            raise DfbenchError(f"DiTi allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.z_dim < 1 or self.steps < 0 or self.batch_size < 1 or not 0 <= self.ema_decay < 1:
            raise DfbenchError(f"DiTi needs z_dim >= 1, steps >= 0, batch_size >= 1 and 0 <= ema_decay < 1: {self}")
        if self.encoder_width % 8 or self.branch_width % 8:
            raise DfbenchError("DiTi encoder_width and branch_width must be multiples of 8 (GroupNorm groups)")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class DiTiObjective(nn.Module):
    """The DiTi loss against a frozen backbone (kept outside the module tree: never trained, never saved)."""

    def __init__(self, backbone: Backbone, config: DiTiConfig):
        super().__init__()
        self.config = config
        self.frozen = backbone
        abar = backbone.alphas_cumprod.detach().float().cpu()
        T = len(abar)
        self.stage_edges = stage_edges(abar)
        ends = block_end_dims(T, config.k, config.z_dim, config.allocation, stages=self.stage_edges)
        visible, new = prefix_masks(ends, config.z_dim)
        self.end_dims = ends
        self.register_buffer("blocks", block_index(T, config.k), persistent=False)
        self.register_buffer("visible", visible, persistent=False)
        self.register_buffer("new", new, persistent=False)
        self.register_buffer("shift", shift_coefficient(abar), persistent=False)
        self.register_buffer("weight", loss_weight(abar, config.snr_gamma), persistent=False)
        self.nfe = 0  # frozen-denoiser calls so far, one per image (a caller charges them as NFEs)

    @property
    def num_timesteps(self) -> int:
        return len(self.blocks)

    def null_condition(self, n: int):
        return self.frozen.null_condition(n)

    @torch.no_grad()
    def frozen_eps(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.nfe += len(z_t)
        return self.frozen.eps(z_t, t, self.null_condition(len(z_t))).float()

    def eps_hat(self, branch: nn.Module, z_t: torch.Tensor, t: torch.Tensor, z_masked: torch.Tensor,
                eps_frozen: torch.Tensor | None = None) -> torch.Tensor:
        """eps_frozen + c_t G(z_t, t, masked z)."""
        eps_frozen = self.frozen_eps(z_t, t) if eps_frozen is None else eps_frozen
        c = self.shift[t].view(-1, *[1] * (z_t.dim() - 1))
        return eps_frozen + c * branch(z_t, t, z_masked).float()

    def draw(self, z0: torch.Tensor, generator: torch.Generator | None = None):
        """(t, noise, z_t) for a batch of clean latents; drawn on the CPU so results do not depend on the device."""
        t = torch.randint(0, self.num_timesteps, (len(z0),), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        t, noise = t.to(z0.device), noise.to(z0.device)
        return t, noise, self.frozen.add_noise(z0, noise, t).float()

    def weighted_error(self, eps: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        w = self.weight[t].view(-1, *[1] * (eps.dim() - 1))
        return (w * (noise - eps) ** 2).mean()

    def loss(self, encoder: nn.Module, branch: nn.Module, x01: torch.Tensor, generator: torch.Generator | None = None,
             grad_mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(DiTi loss, the frozen model's loss on the same draws) for clean images ``x01`` in [0, 1]."""
        grad_mode = grad_mode or self.config.grad_mode
        with torch.no_grad():
            z0 = self.frozen.encode(x01).float()
        t, noise, z_t = self.draw(z0, generator)
        eps_frozen = self.frozen_eps(z_t, t)
        z = encoder(x01).float()
        b = self.blocks[t]
        total = z.new_zeros(())
        if grad_mode in ("base", "dual"):
            total = total + self.weighted_error(self.eps_hat(branch, z_t, t, z * self.visible[b], eps_frozen), noise, t)
        if grad_mode in ("stop_grad", "dual"):
            earlier = self.visible[b] - self.new[b]
            z_sg = z.detach() * earlier + z * self.new[b]
            total = total + self.weighted_error(self.eps_hat(branch, z_t, t, z_sg, eps_frozen), noise, t)
        return total, self.weighted_error(eps_frozen, noise, t).detach()


def as_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (how image sets are kept) or floats in [0, 1] -> float [0, 1]."""
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


@torch.no_grad()
def evaluate_loss(objective: DiTiObjective, encoder: nn.Module, branch: nn.Module, images: torch.Tensor,
                  batch_size: int = 128, seed: int = 1234) -> tuple[float, float]:
    """(DiTi loss, frozen loss) over ``images`` with fixed time steps and noise (mode ``base``)."""
    g = torch.Generator().manual_seed(seed)
    device = objective.shift.device
    totals, n = torch.zeros(2, dtype=torch.float64), 0
    for start in range(0, len(images), batch_size):
        x = as_unit(images[start:start + batch_size].to(device))
        loss, frozen = objective.loss(encoder, branch, x, generator=g, grad_mode="base")
        totals += torch.tensor([loss.item(), frozen.item()], dtype=torch.float64) * len(x)
        n += len(x)
    return tuple((totals / max(n, 1)).tolist())
