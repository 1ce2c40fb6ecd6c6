"""DomainFusion's maths: the latent-distillation gradient, the style/content candidate rule and the
recombination, a refresh's choice, and the distillation's minibatch stride (its runs: test_domainfusion_runs)."""

import json

import numpy as np
import pytest
import torch

from domainfusion_bench.algorithms.domainfusion import latent_distillation, sds_weight, timestep_range
from domainfusion_bench.diffusion import PixelDDPMBackbone, PixelDDPMConfig
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.networks import SmallCNN
from domainfusion_bench.networks.style_content import StyleContentNet, content_style_choice, recombine, style_content


def algorithm_defaults(name):
    from domainfusion_bench.algorithms import algorithm_space
    from domainfusion_bench.data import dataset_class

    return algorithm_space(name, dataset_class("DigitStyles")).defaults()


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


def test_the_loss_adds_lambda_times_the_distillation_gradient_through_p_true(monkeypatch):
    """DomainFusion.loss on a linear softmax classifier: grad(loss) - grad(CE) = lambda x the hand-written
    SDS gradient sum_i dL_LD/dp_i dp_i/dW (a p_true detached before the term makes the difference 0), and
    the term's denoiser calls are charged as ld_nfe."""
    from types import SimpleNamespace

    from domainfusion_bench.algorithms import ALGORITHMS
    from domainfusion_bench.algorithms import domainfusion as df
    from domainfusion_bench.costs import CostMeter

    lam, k = 0.7, 3
    hp = {**algorithm_defaults("DomainFusion-LD"), "df_ld_weight": lam}
    algo = ALGORITHMS.get("DomainFusion-LD")((3, 8, 8), k, 2, hp)
    g = torch.Generator().manual_seed(3)
    W = torch.nn.Parameter(0.05 * torch.randn(k, 3 * 8 * 8, generator=g))
    algo.network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, k, bias=False))
    algo.network[1].weight = W
    algo._diffusion = tiny_backbone()
    algo._context = SimpleNamespace(dataset=SimpleNamespace(to_unit=lambda x: x), costs=CostMeter())
    seen = []
    real = df.latent_distillation
    monkeypatch.setattr(df, "latent_distillation", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    x = torch.rand(6, 3, 8, 8, generator=g)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    torch.manual_seed(4)
    loss, terms = algo.loss([(x[:3], y[:3]), (x[3:], y[3:])])
    (total,) = torch.autograd.grad(loss, W)
    f = x.flatten(1)
    probs = torch.softmax(f @ W.T, dim=1)
    (ce,) = torch.autograd.grad(torch.nn.functional.cross_entropy(f @ W.T, y), W)

    ld = seen[-1]
    residual = ld.weight * (ld.eps_hat - ld.noise)
    dl_dp = (residual * 2 * x).flatten(1).sum(1) / residual.numel()  # z = 2 p x - 1 for the pixel model
    p = probs.gather(1, y.view(-1, 1)).detach()
    analytic = (dl_dp.view(-1, 1) * p * (torch.nn.functional.one_hot(y, k) - probs.detach())).T @ f
    assert (lam * analytic).abs().max() > 1e-6
    assert torch.allclose(total - ce, lam * analytic, rtol=1e-3, atol=1e-9)
    assert terms["loss_ld"].item() == pytest.approx(ld.loss.item())
    assert algo._context.costs.totals["ld_nfe"] == 6
    algo.loss([(x[:3], y[:3]), (x[3:], y[3:])])
    assert algo._context.costs.totals["ld_nfe"] == 12


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
    conditions = []
    build = backbone.condition
    backbone.condition = lambda *a, **k: conditions.append(build(*a, **k)) or conditions[-1]
    ld = latent_distillation(backbone, torch.rand(2, 3, 8, 8), torch.ones(2), torch.tensor([0, 1]))
    assert torch.isfinite(ld.loss)
    assert len(conditions) == 1 and conditions[0].class_ids.tolist() == [0, 1]
    assert not conditions[0].domain_weights.any()  # class y0, no domain: nothing of any domain, held out or not
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


def constructed_candidates(g=None):
    """A pool image and three candidates in which each criterion has its own winner: 0 is the pool image
    plus noise (closest style, content slightly off), 1 a per-channel affine change of it (identical
    content: c*), 2 another image in a far style (s*)."""
    g = g or torch.Generator().manual_seed(0)
    ref = 0.3 + 0.4 * torch.rand(1, 3, 8, 8, generator=g)
    noisy = (ref + 0.05 * torch.randn(1, 3, 8, 8, generator=g)).clamp(0, 1)
    affine = ref * torch.tensor([0.9, 0.8, 1.1]).view(1, 3, 1, 1) + 0.05
    far = 0.9 - 0.1 * torch.rand(1, 3, 8, 8, generator=g)
    return ref, torch.stack([noisy[0], affine[0], far[0]]).unsqueeze(0)


def test_content_and_style_each_choose_their_own_candidate():
    ref, candidates = constructed_candidates()
    content, style = content_style_choice(ref, candidates)
    assert content.tolist() == [1] and style.tolist() == [2]  # a rule ignoring either one returns 1 == 1 or 2 == 2
    # batched, and independent per reference: reversing the candidates reverses the picks
    content, style = content_style_choice(torch.cat([ref, ref]), torch.cat([candidates, candidates.flip(1)]))
    assert content.tolist() == [1, 1] and style.tolist() == [2, 0]
    # ties go to the lower index
    twins = torch.cat([candidates[:, 1:2], candidates[:, 1:2]], dim=1)
    assert [i.tolist() for i in content_style_choice(ref, twins)] == [[0], [0]]
    with pytest.raises(DfbenchError, match="matching P, C, H, W"):
        content_style_choice(ref, candidates[:, :, :2])


def test_recombine_keeps_the_content_phase_and_takes_the_style_amplitude():
    _, candidates = constructed_candidates()
    c, s = candidates[:, 1], candidates[:, 2]
    out = recombine(c, s)
    spec_out, spec_c, spec_s = (torch.fft.fft2(v) for v in (out, c, s))
    assert torch.allclose(spec_out.abs(), spec_s.abs(), atol=2e-3)  # the style image's amplitude
    keep = spec_out.abs() > 1e-3
    assert torch.allclose(torch.polar(torch.ones_like(spec_c.abs()), spec_out.angle())[keep],
                          torch.polar(torch.ones_like(spec_c.abs()), spec_c.angle())[keep], atol=2e-3)  # c's phase
    assert not torch.allclose(out, c, atol=0.02) and not torch.allclose(out, s, atol=0.02)
    assert torch.allclose(recombine(c, c), c, atol=1e-5) and torch.allclose(recombine(c, s, 0.0), c, atol=1e-5)
    half = recombine(c, s, 0.5)
    assert torch.allclose(torch.fft.fft2(half).abs(), (spec_c.abs() + spec_s.abs()) / 2, atol=2e-3)
    with pytest.raises(DfbenchError, match="df_style_weight"):
        recombine(c, s, 1.5)
    with pytest.raises(DfbenchError, match="one shape"):
        recombine(c, s[:, :2])


class PixelFeatures(torch.nn.Module):
    """Images as their own feature maps: the constructed examples' content and style are the pixels'."""

    name = "pixels"

    def forward(self, x01):
        return x01


def test_a_refresh_stores_the_recombination_of_the_chosen_candidates(monkeypatch):
    """refresh(): the stored pool image is recombine(c*, s*) of its candidates, not a candidate, and the
    rule's choice, not a fixed one (a refresh keeping candidate 0, c*, or s* fails here)."""
    from types import SimpleNamespace

    from domainfusion_bench.algorithms import ALGORITHMS
    from domainfusion_bench.algorithms import domainfusion as df
    from domainfusion_bench.costs import MetricMeter

    ref, candidates = constructed_candidates()
    other_ref, other = constructed_candidates(torch.Generator().manual_seed(5))
    other = other.flip(1)  # the second domain's pool image: c* = 1, s* = 0
    hp = {**algorithm_defaults("DomainFusion"), "df_candidates": 3, "og_measure": False}
    algo = ALGORITHMS.get("DomainFusion")((3, 8, 8), 3, 3, hp)
    to8 = algo.to_uint8
    algo._pools = [{"images": to8(r), "labels": torch.tensor([1]), "sources": torch.tensor([7])}
                   for r in (ref, other_ref)]
    algo._diffusion = SimpleNamespace(resolution=8)
    made = {1: to8(candidates[0]), 2: to8(other[0])}
    asked = []

    def img2img(self, context, requests, desc):
        asked.append(len(requests))
        return made[requests[0].source_domain]

    monkeypatch.setattr(df.DomainFusion, "_img2img", img2img)
    monkeypatch.setattr(df.StyleContentNet, "choose", classmethod(lambda cls, *a: PixelFeatures()))
    ds = SimpleNamespace(name="Toy", domains=["a", "b", "c"], from_unit=lambda x: x)
    context = SimpleNamespace(dataset=ds, device="cpu", train_envs=[1, 2], args=SimpleNamespace(trial_seed=0),
                              heartbeat=lambda: None, metrics=MetricMeter())
    algo.refresh(context)
    assert asked == [3, 3] and algo._refreshes == 1
    for pool, grid, (c, s) in zip(algo._pools, made.values(), [(1, 2), (1, 0)]):
        g = grid.float() / 255
        assert torch.equal(pool["images"], to8(recombine(g[c:c + 1], g[s:s + 1])))
        assert all((pool["images"][0].int() - grid[k].int()).abs().max() > 10 for k in range(3))
    assert algo._recombined == 1.0


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


# --- the algorithm on DigitStyles ------------------------------------------------------------------
# 3 DDPM steps, img2img over 2 DDIM steps, 8 pool images per domain, batch 16 (22.5 steps per epoch):
# a refresh every 3 steps


def test_distillation_reads_an_even_stride_of_the_minibatch(monkeypatch):
    from types import SimpleNamespace

    from domainfusion_bench.algorithms import ALGORITHMS, algorithm_space
    from domainfusion_bench.algorithms import domainfusion as df
    from domainfusion_bench.costs import CostMeter
    from domainfusion_bench.data import dataset_class

    hp = {**algorithm_space("DomainFusion-LD", dataset_class("DigitStyles")).defaults(), "df_ld_batch": 4}
    algo = ALGORITHMS.get("DomainFusion-LD")((3, 32, 32), 10, 3, hp)
    seen = []

    def recorder(backbone, x01, p_true, y, **kw):
        seen.append((x01.clone(), p_true, y))
        return SimpleNamespace(loss=(p_true * 0).sum(), t=torch.zeros(len(y)))

    monkeypatch.setattr(df, "latent_distillation", recorder)
    algo._diffusion = object()
    algo._context = SimpleNamespace(dataset=SimpleNamespace(to_unit=lambda x: x), costs=CostMeter())
    x = torch.arange(12.0).view(12, 1, 1, 1).expand(12, 3, 32, 32)  # 3 domains x 4 images, tagged by value
    minibatches = [(x[4 * d:4 * d + 4], torch.arange(4) + d) for d in range(3)]
    algo.loss(minibatches)
    x01, p_true, y = seen[-1]
    assert x01[:, 0, 0, 0].tolist() == [0.0, 3.0, 6.0, 9.0] and y.tolist() == [0, 3, 3, 3] and len(p_true) == 4
    algo.hparams["df_ld_batch"] = 0  # the default: every image, as the paper
    algo.loss(minibatches)
    assert len(seen[-1][0]) == 12
    assert algo._context.costs.totals["ld_nfe"] == 4 + 12
