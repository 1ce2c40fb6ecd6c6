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
The boundaries are the reference's t on its linear 1000-step schedule; on another schedule each one
moves to the t with the same alpha-bar (``stage_edges``: 104, 203, 564, 818, 1000 on our cosine pixel
DDPM), so a stage spans the same noise levels as in the paper.

Gradient modes, as in the reference: ``base`` (every unmasked dim receives gradient), ``stop_grad``
(only the dims new in block(t) do; the earlier ones are detached), ``dual`` (the sum of both losses).

Ours, where the reference fixes nothing for small data: the branch is a small diffusers UNet2DModel
of its own over folded patches (the reference grows a second decoder half out of the frozen UNet's
encoder), so it works for any backbone, pixel or latent, without surgery; its last conv starts at
zero, so an untrained branch reproduces the frozen model exactly. The encoder is a small conv net for
28-64 px. A few hundred steps at lr 1e-3 with EMA 0.99 replace the reference's long 1e-4 / 0.9999 run.
"""

from domainfusion_bench.diffusion.diti.networks import (
    DiTiEncoder,
    DiTiModel,
    ShiftBranch,
)
from domainfusion_bench.diffusion.diti.objective import (
    DiTiConfig,
    DiTiObjective,
    as_unit,
    evaluate_loss,
)
from domainfusion_bench.diffusion.diti.pretrain import (
    build_model,
    encoder_resolution,
    pretrain_diti,
)
from domainfusion_bench.diffusion.diti.probes import (
    format_probe_table,
    linear_probe,
    probe_slices,
    stage_slices,
)
from domainfusion_bench.diffusion.diti.schedule import (
    ALLOCATIONS,
    DIMS_PER_STAGE,
    GRAD_MODES,
    STAGES,
    block_end_dims,
    block_stages,
    block_index,
    loss_weight,
    prefix_masks,
    scaled_dims,
    reference_alphas_cumprod,
    shift_coefficient,
    stage_edges,
)

__all__ = [
    "DiTiEncoder", "DiTiModel", "ShiftBranch", "DiTiConfig", "DiTiObjective", "as_unit", "evaluate_loss",
    "build_model", "encoder_resolution", "pretrain_diti", "format_probe_table", "linear_probe",
    "probe_slices", "stage_slices", "ALLOCATIONS", "DIMS_PER_STAGE", "GRAD_MODES", "STAGES", "block_end_dims", "block_stages",
    "block_index", "loss_weight", "prefix_masks", "reference_alphas_cumprod", "scaled_dims", "shift_coefficient",
    "stage_edges",
]
