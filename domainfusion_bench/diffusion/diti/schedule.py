"""DiTi's time-step maths: blocks of time steps, the stage allocation of z's dims, the prefix masks, and the
shift coefficient and loss weight read off the frozen model's alpha-bar table."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from domainfusion_bench.errors import DfbenchError

# the reference's stage edges, tuned on its schedule (``reference_alphas_cumprod``); ``stage_edges`` moves them
# onto another schedule by alpha-bar
STAGES = (50, 100, 300, 500, 1000)
DIMS_PER_STAGE = (10, 25, 327, 100, 50)
GRAD_MODES = ("base", "stop_grad", "dual")
ALLOCATIONS = ("stages", "uniform")


def reference_alphas_cumprod() -> torch.Tensor:
    """The schedule STAGES were tuned on: DDPM's linear betas 1e-4 .. 0.02 over 1000 steps (float64)."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


def stage_edges(alphas_cumprod: torch.Tensor, stages: Sequence[int] = STAGES) -> list[int]:
    """The reference's stage edges on this schedule, matched by alpha-bar: an edge t (its stage holds the time
    steps below t) becomes the first time step here whose abar is at or below the reference's abar_t; the
    last edge is T. The identity on the reference's own schedule; on the cosine schedule of our pixel DDPM
    (50, 100, 300, 500, 1000) become (104, 203, 564, 818, 1000): the same noise levels, not the same t."""
    reference = reference_alphas_cumprod()
    if list(stages)[-1] != len(reference) or any(not 0 < e < len(reference) for e in list(stages)[:-1]):
        raise DfbenchError(f"DiTi stages {list(stages)} must be reference time steps in (0, {len(reference)}), "
                           f"the last one {len(reference)}")
    abar = alphas_cumprod.detach().double().cpu()
    return [int((abar > reference[e]).sum()) for e in list(stages)[:-1]] + [len(abar)]


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


def block_stages(num_timesteps: int, k: int, stages: Sequence[int] = STAGES) -> list[int]:
    """The stage of each block: the one its first time step lies in (``stages``: edges on this schedule)."""
    blocks = block_index(num_timesteps, k)
    first_t = [int((blocks == b).nonzero()[0]) for b in range(k)]
    return [next(s for s, edge in enumerate(stages) if t < edge) for t in first_t]


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
    stage_of = block_stages(num_timesteps, k, stages)
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
