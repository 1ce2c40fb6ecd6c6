"""DiTi: time-step-partitioned representations learnt against a frozen diffusion model (Yue et al., ICLR 2024).

The pretrained denoiser stays frozen. An encoder maps a clean image to z in R^d (d = 512 by default)
and a small shift branch reads (z_t, t, masked z) and outputs G; the noise estimate becomes

    eps_hat = eps_frozen(z_t, t) + c_t * G,   c_t = -sqrt(alpha_t) (1 - abar_{t-1}) / sqrt(1 - abar_t)

(abar_{-1} = 1, so c_0 = 0), trained with loss = mean lambda_t ||eps - eps_hat||^2,
lambda_t = SNR_t^0.1 / (1 + SNR_t), SNR_t = abar_t / (1 - abar_t). Both constants are the public
implementation's (its GaussianDiffusion ``shift_coef`` and ``weight``).

Time steps 0..T-1 are cut into k blocks, block(t) = floor(t k / T). At time t the branch sees only
the prefix z[0 : end(block(t))], the rest zeroed: few dims at low noise, all of them near T, so the
leading dims must carry what matters at every noise level and the trailing ones the coarse content
that only high-noise steps need. ``end`` comes from a stage allocation: stage boundaries
(50, 100, 300, 500, 1000) get (10, 25, 327, 100, 50) dims, a stage's dims shared out over the blocks
whose first time step lies in it (the reference's rule: floor(dims / blocks) per block, the stage's
last block ending exactly at the stage's cumulative total); "uniform" gives every block d / k dims.

Gradient modes, as in the reference: ``base`` (every unmasked dim receives gradient), ``stop_grad``
(only the dims new in block(t) do; the earlier ones are detached), ``dual`` (the sum of both losses).

Ours, where the reference fixes nothing for small data: the branch is a small diffusers UNet2DModel
of its own over folded patches (the reference grows a second decoder half out of the frozen UNet's
encoder), so it works for any backbone, pixel or latent, without surgery; its last conv starts at
zero, so an untrained branch reproduces the frozen model exactly. The encoder is a small conv net for
28-64 px. A few hundred steps at lr 1e-3 with EMA 0.99 replace the reference's long 1e-4 / 0.9999 run.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from domainfusion_bench.diffusion.backbones import Backbone, resize
from domainfusion_bench.errors import DfbenchError

STAGES = (50, 100, 300, 500, 1000)
DIMS_PER_STAGE = (10, 25, 327, 100, 50)
GRAD_MODES = ("base", "stop_grad", "dual")
ALLOCATIONS = ("stages", "uniform")


# ------------------------------------------------------------------------------------------------
# Blocks, stages, masks
# ------------------------------------------------------------------------------------------------

def block_index(num_timesteps: int, k: int) -> torch.Tensor:
    """block(t) = floor(t k / T) for t = 0..T-1 (integer arithmetic: no float edge cases)."""
    if not 1 <= k <= num_timesteps:
        raise DfbenchError(f"DiTi needs 1 <= k <= T blocks, got k={k} for T={num_timesteps}")
    return torch.arange(num_timesteps) * k // num_timesteps


def scaled_dims(dims: Sequence[int], z_dim: int) -> list[int]:
    """Stage dims rescaled to sum to ``z_dim`` (largest remainders), for a z smaller or larger than 512."""
    total = sum(dims)
    if total == z_dim:
        return list(dims)
    exact = [d * z_dim / total for d in dims]
    out = [math.floor(e) for e in exact]
    for i in sorted(range(len(dims)), key=lambda i: out[i] - exact[i])[: z_dim - sum(out)]:
        out[i] += 1
    return out


def block_end_dims(num_timesteps: int, k: int, z_dim: int, allocation: str = "stages",
                   stages: Sequence[int] = STAGES, dims_per_stage: Sequence[int] = DIMS_PER_STAGE) -> list[int]:
    """end(b) for b = 0..k-1: block b's branch input is the prefix z[0:end(b)] (non-decreasing, end(k-1) = z_dim)."""
    if allocation not in ALLOCATIONS:
        raise DfbenchError(f"DiTi allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    if allocation == "uniform":
        if z_dim < k:
            raise DfbenchError(f"the uniform DiTi allocation needs z_dim >= k ({z_dim} < {k})")
        return [z_dim * (b + 1) // k for b in range(k)]
    stages, dims = list(stages), scaled_dims(dims_per_stage, z_dim)
    if len(stages) != len(dims) or stages != sorted(stages) or stages[-1] != num_timesteps:
        raise DfbenchError(f"DiTi stages {stages} must increase, end at T={num_timesteps} and match the "
                           f"{len(dims)} dims_per_stage")
    blocks = block_index(num_timesteps, k)
    first_t = [int((blocks == b).nonzero()[0]) for b in range(k)]
    stage_of = [next(s for s, edge in enumerate(stages) if t < edge) for t in first_t]
    ends = []
    for b in range(k):
        s = stage_of[b]
        members = [i for i in range(k) if stage_of[i] == s]
        before = sum(dims[:s])
        if b == members[-1]:
            ends.append(before + dims[s])
        else:
            ends.append(before + dims[s] // len(members) * (members.index(b) + 1))
    empty = [stages[s] for s in range(len(stages)) if s not in stage_of]
    if empty:
        raise DfbenchError(f"DiTi stage(s) ending at t={empty} hold no block of {k}; use fewer stages or more blocks")
    return ends


def prefix_masks(end_dims: Sequence[int], z_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible, new): [k, z_dim] masks; visible[b] = 1 on z[0:end(b)], new[b] = 1 on z[end(b-1):end(b)]."""
    ends = torch.tensor(list(end_dims))
    starts = torch.cat([torch.zeros(1, dtype=ends.dtype), ends[:-1]])
    dim = torch.arange(z_dim).unsqueeze(0)
    visible = (dim < ends.unsqueeze(1)).float()
    new = visible * (dim >= starts.unsqueeze(1)).float()
    return visible, new


# ------------------------------------------------------------------------------------------------
# Schedule constants (from the frozen model's alpha-bar table)
# ------------------------------------------------------------------------------------------------

def shift_coefficient(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """c_t = -sqrt(alpha_t) (1 - abar_{t-1}) / sqrt(1 - abar_t), with abar_{-1} = 1 (so c_0 = 0)."""
    abar = alphas_cumprod.double()
    prev = torch.cat([torch.ones(1, dtype=abar.dtype, device=abar.device), abar[:-1]])
    return (-(abar / prev).sqrt() * (1 - prev) / (1 - abar).sqrt()).float()


def loss_weight(alphas_cumprod: torch.Tensor, gamma: float = 0.1) -> torch.Tensor:
    """lambda_t = SNR_t^gamma / (1 + SNR_t), SNR_t = abar_t / (1 - abar_t); gamma = 0.1 in the reference."""
    abar = alphas_cumprod.double()
    snr = abar / (1 - abar)
    return (snr**gamma / (1 + snr)).float()


# ------------------------------------------------------------------------------------------------
# Networks
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# The objective
# ------------------------------------------------------------------------------------------------

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
        ends = block_end_dims(T, config.k, config.z_dim, config.allocation)
        visible, new = prefix_masks(ends, config.z_dim)
        self.end_dims = ends
        self.register_buffer("blocks", block_index(T, config.k), persistent=False)
        self.register_buffer("visible", visible, persistent=False)
        self.register_buffer("new", new, persistent=False)
        self.register_buffer("shift", shift_coefficient(abar), persistent=False)
        self.register_buffer("weight", loss_weight(abar, config.snr_gamma), persistent=False)

    @property
    def num_timesteps(self) -> int:
        return len(self.blocks)

    def null_condition(self, n: int):
        return self.frozen.null_condition(n)

    @torch.no_grad()
    def frozen_eps(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
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


# ------------------------------------------------------------------------------------------------
# Pre-training
# ------------------------------------------------------------------------------------------------

class DiTiModel(nn.Module):
    """The trained pair, as one module (what the cached-model store saves)."""

    def __init__(self, encoder: DiTiEncoder, branch: ShiftBranch):
        super().__init__()
        self.encoder, self.branch = encoder, branch


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
    from tqdm.auto import tqdm

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
        start, losses = time.perf_counter(), []
        bar = tqdm(range(config.steps), desc=desc, disable=not progress, mininterval=1.0, dynamic_ncols=True)
        for step in bar:
            idx = torch.randint(len(images), (config.batch_size,), generator=g)
            loss, frozen = objective.loss(encoder, branch, as_unit(images[idx].to(device)), generator=g)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema.step(params)
            losses.append(loss.item())
            if step % 20 == 0 or step == config.steps - 1:
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
                if heartbeat is not None:
                    heartbeat()
        bar.close()
        if config.steps:
            ema.copy_to(params)
        encoder.eval(), branch.eval()
        seconds = time.perf_counter() - start
        held = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(7))[:256]]
        eval_loss, eval_frozen = evaluate_loss(objective, encoder, branch, held)
        with torch.no_grad():
            z = torch.cat([encoder(as_unit(images[i:i + 256].to(device))).float().cpu() for i in range(0, len(images), 256)])
    tail = losses[-50:] or [float("nan")]
    info = {"train_seconds": seconds, "final_loss": sum(tail) / len(tail), "eval_loss": eval_loss,
            "eval_frozen_loss": eval_frozen, "steps": config.steps, "n_images": len(images),
            "end_dims": objective.end_dims, "config": config.to_json(), "device": str(device),
            "z_mean": z.mean(0).tolist(), "z_std": z.std(0).nan_to_num(1.0).clamp(min=1e-6).tolist()}
    return encoder.requires_grad_(False), branch.requires_grad_(False), info


# ------------------------------------------------------------------------------------------------
# Probing time-step slices
# ------------------------------------------------------------------------------------------------

def stage_slices(end_dims: Sequence[int], num_timesteps: int, k: int, stages: Sequence[int] = STAGES) -> list[dict[str, Any]]:
    """Per stage of time steps: the z slice that becomes visible there (the dims of the blocks whose first
    time step lies in the stage), then the prefixes (all that is visible by each stage's end), then all of z."""
    first_t = [-(-b * num_timesteps // k) for b in range(k)]  # ceil(b T / k): block b's first time step
    rows, lo_t = [], 0
    for hi_t in stages:
        members = [b for b in range(k) if lo_t <= first_t[b] < hi_t]
        if members:
            b0, b1 = members[0], members[-1]
            rows.append({"slice": f"t {lo_t}-{hi_t}", "blocks": f"{b0}-{b1}",
                         "dims": (end_dims[b0 - 1] if b0 else 0, end_dims[b1])})
        lo_t = hi_t
    prefixes = [{"slice": f"t < {r['slice'].split('-')[1]} (prefix)", "blocks": f"0-{r['blocks'].split('-')[1]}",
                 "dims": (0, r["dims"][1])} for r in rows[1:-1]]
    return rows + prefixes + [{"slice": "all", "blocks": f"0-{k - 1}", "dims": (0, end_dims[-1])}]


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 seed: int = 0) -> float:
    """Accuracy on (test_x, test_y) of a logistic regression fitted on standardised train_x."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if train_x.shape[1] == 0 or len(set(train_y.tolist())) < 2:
        return float("nan")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    model.fit(train_x.double().numpy(), train_y.numpy())
    return float((model.predict(test_x.double().numpy()) == test_y.numpy()).mean())


def probe_slices(z_fit: torch.Tensor, y_fit: torch.Tensor, d_fit: torch.Tensor, z_eval: torch.Tensor,
                 y_eval: torch.Tensor, d_eval: torch.Tensor, slices: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Class and domain accuracy of linear probes on each z slice (fit on one set, scored on another)."""
    out = []
    for s in slices:
        a, b = s["dims"]
        out.append({**s, "dims": f"{a}-{b}", "n_dims": b - a,
                    "class_acc": linear_probe(z_fit[:, a:b], y_fit, z_eval[:, a:b], y_eval),
                    "domain_acc": linear_probe(z_fit[:, a:b], d_fit, z_eval[:, a:b], d_eval)})
    return out


def format_probe_table(rows: Sequence[dict[str, Any]], n_classes: int, n_domains: int) -> str:
    head = f"{'slice':<22} {'blocks':>7} {'dims':>9} {'class acc':>10} {'domain acc':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['slice']:<22} {r['blocks']:>7} {r['dims']:>9} {r['class_acc']:>10.3f} {r['domain_acc']:>11.3f}")
    lines.append(f"(chance: class {1 / n_classes:.3f}, domain {1 / max(n_domains, 1):.3f})")
    return "\n".join(lines)
