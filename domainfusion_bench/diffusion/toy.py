"""An exact toy backbone: an equal-weight isotropic Gaussian mixture of 2-D points.

Its noise prediction is exact (eps = -sqrt(1 - abar_t) * the score of the noised mixture), so tests of
samplers and guidance (TGDP's density-ratio guidance, oracle guidance) measure the guidance alone, not a
learned model's error.
"""

from __future__ import annotations

from typing import Sequence

import torch

from domainfusion_bench.diffusion.backbones import Backbone


class GaussianMixtureBackbone(Backbone):
    """Points in R^2 (latent shape (2,)) from modes ``means`` with per-axis std ``std``."""

    kind = "gaussian_mixture"

    def __init__(self, means: Sequence[Sequence[float]] | torch.Tensor, std: float, domains: Sequence[str] = ("toy",),
                 key: str = "toy-mixture"):
        from diffusers import DDPMScheduler

        super().__init__(dataset="toy", domains=list(domains), classes=["point"], image_channels=2, resolution=1,
                         scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear"), key=key)
        self.means = torch.as_tensor(means, dtype=torch.float32)
        self.std = float(std)

    def ddim_overrides(self):
        return {"clip_sample": False}

    def modules(self):
        return {}

    def latent_shape(self):
        return (2,)

    def encode(self, x):
        return x.float()

    def decode(self, z):
        return z.float()

    def log_density(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p_t(z) of the noised mixture, up to a constant that does not depend on z."""
        abar = self.alphas_cumprod[t.long()].view(-1, 1)
        var = abar * self.std**2 + 1 - abar
        d = z.float().view(-1, 1, 2) - abar.sqrt().unsqueeze(1) * self.means.view(1, -1, 2)
        return torch.logsumexp(-(d**2).sum(-1) / (2 * var), 1) - torch.log(var.squeeze(1))

    def _predict(self, z_t, t, cond):  # epsilon prediction, in closed form
        abar = self.alphas_cumprod[t.long()].view(-1, 1, 1)
        var = abar * self.std**2 + 1 - abar
        d = z_t.float().view(-1, 1, 2) - abar.sqrt() * self.means.view(1, -1, 2)
        resp = (-(d**2).sum(-1, keepdim=True) / (2 * var)).softmax(1)
        score = -(resp * d).sum(1) / var.view(-1, 1)
        return -(1 - abar.view(-1, 1)).sqrt() * score
