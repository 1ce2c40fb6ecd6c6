"""DiTi's trained networks: the image encoder, the shift branch and the pair as one module."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from domainfusion_bench.diffusion.backbones import resize
from domainfusion_bench.errors import DfbenchError


class DiTiEncoder(nn.Module):
    """x in [0, 1] (any size; resized to ``resolution``) -> z in R^z_dim: stride-2 convs to 4x4, then a linear map."""

    def __init__(self, in_channels: int, z_dim: int = 512, width: int = 32, resolution: int = 32):
        super().__init__()
        if resolution < 8 or resolution & (resolution - 1):
            raise DfbenchError(f"the DiTi encoder takes power-of-two resolutions >= 8, got {resolution}")
        self.in_channels, self.z_dim, self.resolution = in_channels, z_dim, resolution
        layers, ch, side = [nn.Conv2d(in_channels, width, 3, padding=1)], width, resolution
        while side > 4:
            out = min(2 * ch, 4 * width)
            layers += [nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, out, 3, stride=2, padding=1)]
            ch, side = out, side // 2
        layers += [nn.GroupNorm(8, ch), nn.SiLU(), nn.Flatten(), nn.Linear(ch * 16, z_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.net(resize(x01.float(), self.resolution) * 2 - 1)


class ShiftBranch(nn.Module):
    """G(z_t, t, masked z): a diffusers UNet2DModel on ``patch`` x ``patch`` folded inputs, z FiLMed in
    through the time embedding (``resnet_time_scale_shift='scale_shift'``, as the reference's shift blocks)."""

    def __init__(self, latent_shape: Sequence[int], z_dim: int = 512, width: int = 32, patch: int | None = None):
        super().__init__()
        from diffusers import UNet2DModel

        channels, side = int(latent_shape[0]), int(latent_shape[-1])
        self.patch = patch if patch is not None else max(1, side // 8)
        if side % self.patch:
            raise DfbenchError(f"DiTi branch patch {self.patch} must divide the latent side {side}")
        folded = channels * self.patch**2
        self.unet = UNet2DModel(
            sample_size=side // self.patch, in_channels=folded, out_channels=folded, block_out_channels=(width,),
            layers_per_block=1, down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
            norm_num_groups=8, class_embed_type="identity", resnet_time_scale_shift="scale_shift",
        )
        self.z_proj = nn.Linear(z_dim, width * 4)  # width * 4 = UNet2DModel's time-embedding size
        nn.init.zeros_(self.unet.conv_out.weight)
        nn.init.zeros_(self.unet.conv_out.bias)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, z_masked: torch.Tensor) -> torch.Tensor:
        folded = F.pixel_unshuffle(z_t, self.patch) if self.patch > 1 else z_t
        out = self.unet(folded, t, class_labels=self.z_proj(z_masked)).sample
        return F.pixel_shuffle(out, self.patch) if self.patch > 1 else out


class DiTiModel(nn.Module):
    """The trained pair, as one module (what the cached-model store saves)."""

    def __init__(self, encoder: DiTiEncoder, branch: ShiftBranch):
        super().__init__()
        self.encoder, self.branch = encoder, branch
