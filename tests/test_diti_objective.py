"""DiTi's objective pinned by hand: which z dims the branch sees at each t, eps_hat - eps_frozen = c_t G,
the weighted loss, the gradient modes, the stage edges mapped by alpha-bar, and the frozen-model calls
a DiTi-finetune run records as NFEs."""

import math

import pytest
import torch
from torch import nn

from domainfusion_bench.diffusion import diti
from domainfusion_bench.diffusion.backbones import PixelDDPMBackbone, PixelDDPMConfig

T, K, Z = 1000, 64, 512
# block edges (t = 15 | 16, 31 | 32), the ends, and t = 0 where c_0 = 0
TIMES = torch.tensor([0, 15, 16, 31, 32, 100, 500, 700, 998, 999])


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    config = PixelDDPMConfig(resolution=8, patch_size=2, block_out_channels=(8, 16), prediction="epsilon")
    return PixelDDPMBackbone.create(config, dataset="RotatedDigits", domains=list("abcd"),
                                    classes=[str(i) for i in range(10)], image_channels=1, key="tiny").eval()


class FixedZ(nn.Module):
    """An 'encoder' returning one fixed z per image (a leaf, so its gradient can be read)."""

    def __init__(self, n):
        super().__init__()
        self.z = nn.Parameter(torch.arange(1.0, n * Z + 1).view(n, Z) / (n * Z))

    def forward(self, x):
        return self.z


class LinearG(nn.Module):
    """A branch whose G is linear in the masked z it sees; records what it saw."""

    def __init__(self, shape):
        super().__init__()
        self.w = torch.randn(Z, math.prod(shape), generator=torch.Generator().manual_seed(1))
        self.shape, self.seen = shape, []

    def forward(self, z_t, t, z_masked):
        self.seen.append((t.clone(), z_masked.detach().clone()))
        return (z_masked @ self.w).view(len(z_t), *self.shape) + 1.0  # + 1: G is non-zero even where z is masked


def fixed_draw(objective, backbone):
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(len(TIMES), *backbone.latent_shape(), generator=g)
    x01 = torch.rand(len(TIMES), *backbone.latent_shape(), generator=g)
    z0 = backbone.encode(x01)
    objective.draw = lambda z0_, generator=None: (TIMES, noise, backbone.add_noise(z0_, noise, TIMES).float())
    return x01, z0, noise


def by_hand(abar):
    """c_t and lambda_t straight from the formulas (abar_{-1} = 1), in float64."""
    abar = abar.double()
    prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    c = -(abar / prev).sqrt() * (1 - prev) / (1 - abar).sqrt()
    snr = abar / (1 - abar)
    return c, snr**0.1 / (1 + snr)


def test_branch_sees_exactly_the_prefix_of_block_t(backbone):
    objective = diti.DiTiObjective(backbone, diti.DiTiConfig(z_dim=Z, k=K))
    x01, _, _ = fixed_draw(objective, backbone)
    encoder, branch = FixedZ(len(TIMES)), LinearG(backbone.latent_shape())
    objective.loss(encoder, branch, x01)
    (t_seen, masked), = branch.seen
    assert torch.equal(t_seen, TIMES)
    ends = objective.end_dims
    for i, t in enumerate(TIMES.tolist()):
        end = ends[t * K // T]  # block(t) = floor(t k / T): few dims at low noise, all of z near T
        assert masked[i, :end].tolist() == encoder.z[i, :end].tolist(), t
        assert not masked[i, end:].any(), (t, end)
    assert ends[0] < ends[1] < ends[2] and ends[-1] == Z  # the rows above see different prefixes


def test_eps_hat_is_frozen_plus_c_t_g_and_the_loss_matches_a_hand_computation(backbone):
    objective = diti.DiTiObjective(backbone, diti.DiTiConfig(z_dim=Z, k=K))
    x01, z0, noise = fixed_draw(objective, backbone)
    encoder, branch = FixedZ(len(TIMES)), LinearG(backbone.latent_shape())
    loss, frozen_loss = objective.loss(encoder, branch, x01)
    z_t = backbone.add_noise(z0, noise, TIMES).float()
    with torch.no_grad():
        eps_frozen = backbone.eps(z_t, TIMES, backbone.null_condition(len(TIMES))).double()
    G = branch(z_t, TIMES, branch.seen[0][1]).detach().double()
    c, lam = by_hand(backbone.alphas_cumprod.cpu())
    shape = (-1, 1, 1, 1)
    eps_hat = objective.eps_hat(branch, z_t, TIMES, branch.seen[0][1]).detach().double()
    assert torch.allclose(eps_hat - eps_frozen, c[TIMES].view(shape) * G, atol=1e-5)
    assert not (eps_hat - eps_frozen)[1:].abs().lt(1e-6).all()  # c_t G is not zero beyond t = 0
    expect = (lam[TIMES].view(shape) * (noise.double() - eps_frozen - c[TIMES].view(shape) * G) ** 2).mean()
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    expect_frozen = (lam[TIMES].view(shape) * (noise.double() - eps_frozen) ** 2).mean()
    assert frozen_loss.item() == pytest.approx(expect_frozen.item(), rel=1e-5)


@pytest.mark.parametrize("mode", diti.GRAD_MODES)
def test_gradient_reaches_the_dims_of_each_mode(backbone, mode):
    """base and dual: every visible dim of block(t); stop_grad: only the dims new in block(t)."""
    objective = diti.DiTiObjective(backbone, diti.DiTiConfig(z_dim=Z, k=K, grad_mode=mode))
    x01, _, _ = fixed_draw(objective, backbone)
    encoder = FixedZ(len(TIMES))
    loss, _ = objective.loss(encoder, LinearG(backbone.latent_shape()), x01)
    loss.backward()
    ends = objective.end_dims
    for i, t in enumerate(TIMES.tolist()):
        if t == 0:
            continue  # c_0 = 0: no gradient at all
        b = t * K // T
        lo = (ends[b - 1] if b else 0) if mode == "stop_grad" else 0
        reached = encoder.z.grad[i].ne(0).nonzero().flatten().tolist()
        assert reached == list(range(lo, ends[b])), (mode, t)
