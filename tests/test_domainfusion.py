"""DomainFusion: the latent-distillation gradient, the style/content candidate rule, the online pool
(refresh, batches, resume), the leakage guard, and a run on DigitStyles that records loss_ld and costs."""

import json

import pytest
import torch

from domainfusion_bench.algorithms.domainfusion import latent_distillation, sds_weight, timestep_range
from domainfusion_bench.diffusion import PixelDDPMBackbone, PixelDDPMConfig
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.networks import SmallCNN
from domainfusion_bench.networks.style_content import StyleContentNet, select_candidates, style_content


def tiny_backbone(channels=3, resolution=8, held_out=()):
    config = PixelDDPMConfig(resolution=resolution, block_out_channels=(8, 8), norm_num_groups=4, prediction="epsilon")
    torch.manual_seed(0)
    backbone = PixelDDPMBackbone.create(config, dataset="Toy", domains=["a", "b", "c"], classes=["0", "1", "2"],
                                        image_channels=channels, seen_domains=[1, 2])
    return backbone.eval().restrict(held_out)


# --- (a) latent distillation -------------------------------------------------------------------------

def test_distillation_gradient_is_the_analytic_sds_gradient():
    """grad_W L_LD = sum_i w(t_i)(eps_hat_i - eps_i) . dz_i/dW / numel, with dz/dp = 2 x0 for the pixel
    model and dp/dW of a linear softmax classifier written out by hand: no denoiser Jacobian in it."""
    backbone = tiny_backbone()
    g = torch.Generator().manual_seed(1)
    b, k = 5, 3
    x0 = torch.rand(b, 3, 8, 8, generator=g)
    y = torch.tensor([0, 1, 2, 1, 0])
    W = (0.05 * torch.randn(k, 3 * 8 * 8, generator=g)).requires_grad_(True)
    f = x0.flatten(1)
    probs = torch.softmax(f @ W.T, dim=1)
    p = probs.gather(1, y.view(-1, 1)).squeeze(1)
    ld = latent_distillation(backbone, x0, p, y, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad(ld.loss, W)

    lo, hi = timestep_range(1000, 0.02, 0.98)
    assert (lo, hi) == (20, 980) and ((ld.t >= lo) & (ld.t <= hi)).all()
    abar = backbone.alphas_cumprod[ld.t].view(-1, 1, 1, 1)
    assert torch.allclose(ld.weight, 1 - abar)
    z_t = abar.sqrt() * (2 * p.detach().view(-1, 1, 1, 1) * x0 - 1) + (1 - abar).sqrt() * ld.noise
    cond = backbone.condition(y, None)
    assert torch.allclose(ld.eps_hat, backbone.eps(z_t, ld.t, cond), atol=1e-5)

    residual = (1 - abar) * (ld.eps_hat - ld.noise)
    dl_dp = (residual * 2 * x0).flatten(1).sum(1) / residual.numel()  # [B]
    onehot = torch.nn.functional.one_hot(y, k).float()
    dp_dlogits = p.detach().view(-1, 1) * (onehot - probs.detach())  # [B, K]
    analytic = (dl_dp.view(-1, 1) * dp_dlogits).T @ f  # [K, D]
    assert grad.abs().max() > 1e-6
    assert torch.allclose(grad, analytic, rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in backbone.model.parameters())
    # the value of the surrogate is <stopgrad(residual), z> mean-reduced
    assert ld.loss.item() == pytest.approx((residual * ld.z.detach()).mean().item(), rel=1e-5)


def test_distillation_weighting_and_timestep_choices():
    abar = torch.tensor([0.2, 0.5, 0.8])
    assert torch.allclose(sds_weight(abar, "1-abar"), 1 - abar)
    assert torch.allclose(sds_weight(abar, "1"), torch.ones(3))
    assert torch.allclose(sds_weight(abar, "snr"), abar / (1 - abar))
    with pytest.raises(DfbenchError, match="df_w must be one of"):
        sds_weight(abar, "cosine")
    with pytest.raises(DfbenchError, match="df_t_min <= df_t_max"):
        timestep_range(1000, 0.9, 0.1)
    backbone = tiny_backbone()
    x0, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    ld = latent_distillation(backbone, x0, torch.ones(4), y, t_min=0.5, t_max=0.5,
                             generator=torch.Generator().manual_seed(0))
    assert (ld.t == 500).all()


def test_distillation_never_conditions_on_a_domain_and_refuses_a_model_that_saw_the_held_out_one():
    backbone = tiny_backbone(held_out=[0])
    ld = latent_distillation(backbone, torch.rand(2, 3, 8, 8), torch.ones(2), torch.tensor([0, 1]))
    assert torch.isfinite(ld.loss)
    with pytest.raises(DfbenchError, match="leakage guard.*saw"):
        tiny_backbone(held_out=[1])  # the model trained on domain 1: it cannot serve a run holding 1 out


# --- style / content -------------------------------------------------------------------------------

def test_style_content_separates_a_per_channel_affine_change():
    f = torch.randn(2, 4, 5, 5)
    scale, shift = torch.rand(1, 4, 1, 1) + 0.5, torch.randn(1, 4, 1, 1)
    s0, c0 = style_content(f)
    s1, c1 = style_content(f * scale + shift)
    assert s0.shape == (2, 8) and c0.shape == (2, 100)
    assert torch.allclose(c0, c1, atol=1e-3)
    assert torch.allclose(s1[:, :4], s0[:, :4] * scale.flatten() + shift.flatten(), atol=1e-5)


def test_selection_picks_the_most_restyled_candidate_among_the_same_content():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 4, 6, 6, generator=g)
    other = torch.randn(1, 4, 6, 6, generator=g)
    candidates = torch.stack([
        ref[0],  # 0: same content, same style
        ref[0] * 2.0 + 1.0,  # 1: same content, strongly restyled  <- the pick
        other[0] * 5.0 + 3.0,  # 2: other content, even more restyled
        ref[0] * 1.2 + 0.1,  # 3: same content, mildly restyled
    ]).unsqueeze(0)
    assert select_candidates(ref, candidates, keep=3).tolist() == [1]
    assert select_candidates(ref, candidates, keep=4).tolist() == [2]  # no content filter: style alone
    assert select_candidates(ref, candidates, keep=1).tolist() in ([0], [1], [3])  # content ties: all cosine 1
    # ties in style distance go to the lower index
    twins = torch.stack([ref[0] * 2 + 1, ref[0] * 2 + 1]).unsqueeze(0)
    assert select_candidates(ref, twins, keep=2).tolist() == [0]
    # batched: each reference gets its own choice
    both = select_candidates(torch.cat([ref, ref]), torch.cat([candidates, candidates.flip(1)]), keep=3)
    assert both.tolist() == [1, 2]
    with pytest.raises(DfbenchError, match="matching P, C, H, W"):
        select_candidates(ref, candidates[:, :, :2], keep=1)


def test_style_network_is_a_frozen_copy_of_the_featurizer_when_no_imagenet_weights():
    featurizer = SmallCNN(3, 16)
    net = StyleContentNet.from_featurizer(featurizer, lambda x: x)
    x = torch.rand(2, 3, 16, 16)
    before = net(x)
    assert before.shape == (2, 16, 8, 8)  # after block2, the middle stage
    with torch.no_grad():
        for p in featurizer.parameters():
            p.add_(1.0)
    assert torch.equal(net(x), before)  # a copy taken at the refresh, not the live network
    assert not any(p.requires_grad for p in net.parameters())
    chosen = StyleContentNet.choose("featurizer", featurizer, lambda x: x)
    assert chosen.name == "featurizer-block2"
    with pytest.raises(DfbenchError, match="df_style_net"):
        StyleContentNet.choose("vgg", featurizer, lambda x: x)
