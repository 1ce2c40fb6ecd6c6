"""Time-conditioned validity classifiers C(x_t, t[, y]): for points (the 2-D toys) and for images or latents."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, num_train_timesteps: int) -> torch.Tensor:
    """Sinusoidal features of t / T (T = the schedule's length), sin first: [B, dim] (diffusers' embedding,
    on t rescaled to 1000 steps so that any schedule's length gives the same features)."""
    from diffusers.models.embeddings import get_timestep_embedding

    t = t.float().view(-1) / num_train_timesteps * 1000.0
    return get_timestep_embedding(t, dim, flip_sin_to_cos=False, downscale_freq_shift=1, max_period=1000)


class ValidityClassifier(nn.Module):
    """Base: ``forward(x_t, t, y=None) -> logit [B]`` of "valid" on a balanced set; ``log_prob`` = log C =
    logsigmoid(logit + prior_logit), where ``prior_logit`` = log(alpha / (1 - alpha)) is set by training:
    the class-prior weighting as a fixed offset (same optimum as the alpha-weighted BCE, see ``training``).

    ``time_conditioned=False`` makes the network blind to t (the ablation: a plain classifier C(x));
    ``num_classes`` > 0 makes it class-conditional: the head has one logit per class (+1 for "no class",
    y = -1) and C(x_t, t, y) reads column y.
    """

    def __init__(self, num_classes: int, time_conditioned: bool, num_train_timesteps: int, emb_dim: int):
        super().__init__()
        self.num_classes = int(num_classes)
        self.time_conditioned = bool(time_conditioned)
        self.num_train_timesteps = int(num_train_timesteps)
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.register_buffer("prior_logit", torch.zeros(()))

    def time_features(self, t: torch.Tensor, n: int, device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if t.dim() == 0:
            t = t.expand(n)
        if not self.time_conditioned:
            t = torch.zeros_like(t)
        return self.time_mlp(timestep_embedding(t, self.emb_dim, self.num_train_timesteps))

    def pick(self, logits: torch.Tensor, y) -> torch.Tensor:
        if self.num_classes == 0 or y is None:
            return logits[:, -1]
        y = torch.as_tensor(y, device=logits.device).long().flatten()
        y = torch.where(y < 0, torch.full_like(y, self.num_classes), y)
        return logits.gather(1, y.view(-1, 1)).squeeze(1)

    def log_prob(self, x_t: torch.Tensor, t, y=None) -> torch.Tensor:
        return F.logsigmoid(self(x_t, t, y).float() + self.prior_logit)


class PointValidityClassifier(ValidityClassifier):
    """MLP for points in R^d (the 2-D toys): [x, time features] -> SiLU layers -> logits."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, num_classes: int = 0,
                 time_conditioned: bool = True, num_train_timesteps: int = 1000, emb_dim: int = 32):
        super().__init__(num_classes, time_conditioned, num_train_timesteps, emb_dim)
        layers, width = [], dim + emb_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, self.num_classes + 1)

    def forward(self, x_t, t, y=None):
        x = x_t.float().flatten(1)
        h = self.body(torch.cat([x, self.time_features(t, len(x), x.device)], dim=1))
        return self.pick(self.head(h), y)


class ImageValidityClassifier(ValidityClassifier):
    """Small CNN on denoiser-space tensors [B, C, H, W] (pixels or latents); the time embedding is added
    per channel after each stage (the DDPM U-Net's way), global average pool, one logit per class."""

    def __init__(self, channels: int, num_classes: int = 0, width: int = 32, time_conditioned: bool = True,
                 num_train_timesteps: int = 1000, emb_dim: int = 64):
        super().__init__(num_classes, time_conditioned, num_train_timesteps, emb_dim)
        widths = [width, 2 * width, 2 * width]
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.embs = nn.ModuleList()
        c_in = channels
        for i, c in enumerate(widths):
            self.convs.append(nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1))
            self.norms.append(nn.GroupNorm(min(8, c), c))
            self.embs.append(nn.Linear(emb_dim, c))
            c_in = c
        self.head = nn.Linear(c_in, self.num_classes + 1)

    def forward(self, x_t, t, y=None):
        h = x_t.float()
        emb = self.time_features(t, len(h), h.device)
        for conv, norm, proj in zip(self.convs, self.norms, self.embs):
            h = F.silu(norm(conv(h)) + proj(emb)[:, :, None, None])
        return self.pick(self.head(h.mean((2, 3))), y)


class WarmStartValidityClassifier(ValidityClassifier):
    """A class-conditional C(x_t, t, y) that starts as a trained image classifier of clean images (the validity
    judge): its ``body`` (a Sequential whose ReLU/SiLU layers end the stages) with a zero-initialised time
    embedding added per channel after each stage, and one logit per class initialised from its ``head`` (+1
    for "no class"). At t = 0 and before training it is the judge's logits; training on noised samples
    teaches it the noisy images. The body must take denoiser-space tensors as they are (a pixel model's
    [-1, 1] images: what the judge's forward feeds its body).

    Why: trained from scratch in a few hundred steps on one draw, a small CNN stays at chance on DigitStyles'
    digit classes even at t = 50 (measured: 15%), so its gradient carries nothing to guide by."""

    def __init__(self, body: nn.Sequential, head: nn.Linear, num_classes: int, time_conditioned: bool = True,
                 num_train_timesteps: int = 1000, emb_dim: int = 64):
        super().__init__(num_classes, time_conditioned, num_train_timesteps, emb_dim)
        if head.out_features != num_classes:
            raise ValueError(f"the warm-start head has {head.out_features} outputs, expected {num_classes} classes")
        self.body = body
        self.embs = nn.ModuleDict()
        channels = None
        for name, layer in body.named_children():
            if isinstance(layer, nn.Conv2d):
                channels = layer.out_channels
            elif isinstance(layer, (nn.ReLU, nn.SiLU)) and channels is not None:
                proj = nn.Linear(emb_dim, channels)
                nn.init.zeros_(proj.weight)
                nn.init.zeros_(proj.bias)
                self.embs[name] = proj
        self.head = nn.Linear(head.in_features, num_classes + 1)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.head.weight[:num_classes] = head.weight
            self.head.bias[:num_classes] = head.bias

    def forward(self, x_t, t, y=None):
        h = x_t.float()
        emb = self.time_features(t, len(h), h.device)
        for name, layer in self.body.named_children():
            h = layer(h)
            if name in self.embs:
                h = h + self.embs[name](emb)[:, :, None, None]
        return self.pick(self.head(h.flatten(1)), y)
