"""DomainFusion: the latent-distillation gradient, the style/content candidate rule, the online pool
(refresh, batches, resume), the leakage guard, and a run on DigitStyles that records loss_ld and costs."""

import json

import numpy as np
import pytest
import torch

from domainfusion_bench.algorithms.domainfusion import latent_distillation, sds_weight, timestep_range
from domainfusion_bench.diffusion import PixelDDPMBackbone, PixelDDPMConfig
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.networks import SmallCNN
from domainfusion_bench.networks.style_content import StyleContentNet, content_style_choice, recombine, style_content


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
POOL = 0.02
FAST = {"batch_size": 16, "cnn_width": 16, "ddpm_steps": 3, "og_judge_steps": 20, "df_strength": 0.2, "df_pool_fraction": POOL,
        "df_refresh_epochs": 0.13, "df_candidates": 2, "df_synthetic_fraction": 0.25}
STEPS, FREQ = 9, 4


def read(run_dir):
    from domainfusion_bench import runfiles

    return [json.loads(line) for line in (run_dir / runfiles.RESULTS).read_text().splitlines()]


def run_args(root, name, algorithm="DomainFusion", data="data", **kw):
    from domainfusion_bench.training import TrainArgs

    base = dict(dataset="DigitStyles", algorithm=algorithm, test_envs=[0], steps=STEPS, checkpoint_freq=FREQ,
                data_dir=str(root / data), hparams=json.dumps(FAST), num_workers=0, device="cpu",
                output_dir=str(root / name))
    base.update(kw)
    return TrainArgs(**base)


@pytest.fixture(scope="module")
def df_runs(tmp_path_factory):
    """An uninterrupted DomainFusion run (batches and pools spied on), and the same run killed after the
    checkpoint that follows the first refresh, then resumed (same caches: it reuses the DDPM and images)."""
    from domainfusion_bench import runfiles
    from domainfusion_bench.algorithms.domainfusion import DomainFusion
    from domainfusion_bench.training import train

    root = tmp_path_factory.mktemp("df")
    mp = pytest.MonkeyPatch()
    seen = {"batches": [], "pools": [], "refresh_steps": []}
    update, refresh, on_step = DomainFusion.update, DomainFusion.refresh, DomainFusion.on_step

    def spy_update(self, minibatches):
        seen["batches"].append([x.detach().clone() for x, _ in minibatches])
        return update(self, minibatches)

    def spy_refresh(self, context):
        seen["pools"].append([p["images"].clone() for p in self._pools])
        refresh(self, context)
        seen["pools"].append([p["images"].clone() for p in self._pools])

    def spy_on_step(self, step, context):
        before = self._refreshes
        out = on_step(self, step, context)
        if self._refreshes != before:
            seen["refresh_steps"].append(step)
        return out

    mp.setattr(DomainFusion, "update", spy_update)
    mp.setattr(DomainFusion, "refresh", spy_refresh)
    mp.setattr(DomainFusion, "on_step", spy_on_step)
    train(run_args(root, "full"))
    full = {k: list(v) for k, v in seen.items()}
    for v in seen.values():
        v.clear()

    real_heartbeat = runfiles.heartbeat

    def kill_after_second_record(run_dir):
        real_heartbeat(run_dir)
        if (run_dir / runfiles.RESULTS).exists() and len(read(run_dir)) == 2:
            raise KeyboardInterrupt("killed")

    mp.setattr(runfiles, "heartbeat", kill_after_second_record)
    with pytest.raises(KeyboardInterrupt):
        train(run_args(root, "killed"))
    before = read(root / "killed")
    killed_refreshes = list(seen["refresh_steps"])
    mp.setattr(runfiles, "heartbeat", real_heartbeat)
    seen["refresh_steps"].clear()
    train(run_args(root, "killed"))
    resumed_refreshes = list(seen["refresh_steps"])
    mp.undo()
    return {"root": root, "full": full, "records": read(root / "full"), "before": before,
            "resumed": read(root / "killed"), "killed_refreshes": killed_refreshes,
            "resumed_refreshes": resumed_refreshes}


def pool_sizes():
    import math

    from domainfusion_bench.data import get_dataset
    from domainfusion_bench.protocol import split_indices

    ds = get_dataset("DigitStyles", "unused")
    n_in = [len(split_indices(len(ds.envs[e]), 0, e, 0.2)[1]) for e in (1, 2, 3)]
    return [math.ceil(POOL * n) for n in n_in], n_in


def test_domainfusion_records_distillation_pool_and_cost(df_runs):
    records = df_runs["records"]
    assert [r["step"] for r in records] == [0, 4, 8]
    assert df_runs["full"]["refresh_steps"] == [3, 6]  # round(0.13 epochs x 22.5 steps) = 3
    sizes, n_in = pool_sizes()
    last = records[-1]
    assert all(np.isfinite(r["loss_ld"]) and 0 < r["p_true"] < 1 for r in records)
    generated = sum(sizes) * (1 + 2 * 2)  # the first fill, then 2 candidates per image at 2 refreshes
    assert last["cost_generated_images"] == generated
    assert last["cost_nfe"] == 2 * generated  # int(10 DDIM steps x 0.2) per image
    assert last["cost_ld_nfe"] == STEPS * 16 * 3 and records[0]["cost_ld_nfe"] == 16 * 3
    assert last["metric_df_refreshes"] == 2 and records[0]["metric_df_refreshes"] == 0
    # the refresh candidates are judged too (before recombination: where oracle guidance acts)
    assert 0 <= last["metric_invalid_rate_candidates"] <= 1 and "metric_invalid_rate_candidates" not in records[0]
    assert last["metric_df_generated_vs_cdga"] == pytest.approx(generated / (sum(n_in) * 2 * 1))
    assert records[0]["metric_df_generated_vs_cdga"] == pytest.approx(sum(sizes) / (sum(n_in) * 2))
    assert last["cost_diffusion_train_seconds"] > 0 and last["cost_generation_seconds"] > 0


def test_the_schedule_counts_are_what_a_real_run_records(df_runs):
    from domainfusion_bench.algorithms.domainfusion_schedule import domainfusion_counts

    _, n_in = pool_sizes()
    counts = domainfusion_counts({**algorithm_defaults("DomainFusion"), **FAST}, STEPS, n_in)
    last = df_runs["records"][-1]
    assert counts.refreshes == last["metric_df_refreshes"] == 2
    assert counts.images == last["cost_generated_images"] and counts.generation_nfe == last["cost_nfe"]
    assert counts.distillation_nfe == last["cost_ld_nfe"] == STEPS * 16 * 3  # every image of every step
    assert 0 < last["metric_df_recombined"] <= 1  # at 2 candidates, c* != s* for some pool images


def in_split_sizes(train_envs):
    from domainfusion_bench.data import get_dataset
    from domainfusion_bench.protocol import split_indices

    ds = get_dataset("DigitStyles", "unused")
    return [len(split_indices(len(ds.envs[e]), 0, e, 0.2)[1]) for e in train_envs]


def test_domainfusion_against_cdga_at_the_demo_and_at_domainbed_length():
    """Counted, not run: the demo's settings (sweeps/demo.yaml, stencil held out) at its 301 steps and at
    DomainBed's 5001. The refreshes follow epochs, so DomainFusion's images grow with the run length while
    CDGA's fixed set does not; the distillation's denoiser calls grow with every step."""
    import yaml

    from domainfusion_bench.algorithms.domainfusion_schedule import cdga_counts, domainfusion_counts

    demo = yaml.safe_load(open("sweeps/demo.yaml"))
    assert demo["steps"] == 301 and demo["test_envs"] == [[2]]
    n_in = in_split_sizes([0, 1, 3])
    hp = {**algorithm_defaults("DomainFusion"), **demo["hparams"]}
    cdga = cdga_counts({**algorithm_defaults("CDGA"), **demo["hparams"]}, n_in)
    assert (cdga.images, cdga.nfe) == (2160, 10800)
    short, long = domainfusion_counts(hp, 301, n_in), domainfusion_counts(hp, 5001, n_in)
    assert (short.refreshes, short.images, short.generation_nfe, short.distillation_nfe) == (1, 162, 810, 9632)
    assert short.images / cdga.images == pytest.approx(0.075) and short.nfe / cdga.nfe == pytest.approx(0.9669, abs=1e-4)
    assert (long.refreshes, long.images, long.generation_nfe, long.distillation_nfe) == (29, 3186, 15930, 160032)
    assert long.images / cdga.images == pytest.approx(1.475) and long.nfe / cdga.nfe == pytest.approx(16.29, abs=0.01)
    # the package defaults (batch 64 per domain, the term on all 192 images of a step): twice the refreshes
    full = domainfusion_counts(algorithm_defaults("DomainFusion"), 5001, n_in)
    assert (full.refreshes, full.images, full.distillation_nfe) == (59, 6426, 960192)


def test_a_refresh_replaces_pool_images_and_the_batches_follow(df_runs):
    full = df_runs["full"]
    old, new = full["pools"][0], full["pools"][1]  # around the refresh at step 3
    changed = sum(int((o != n).flatten(1).any(1).sum()) for o, n in zip(old, new))
    assert changed >= 0.8 * sum(len(o) for o in old)

    def synthetic_hits(batches, pool):
        x = torch.cat([b[d] for b in batches for d in range(3)]).flatten(1)
        images = torch.cat(pool).float().div(255).flatten(1)
        distance = torch.cdist(x, images, compute_mode="donot_use_mm_for_euclid_dist")
        return (distance.min(1).values < 1e-5).float().mean().item()

    before, after = full["batches"][:3], full["batches"][3:6]
    assert 0.1 < synthetic_hits(before, old) < 0.4  # df_synthetic_fraction 0.25 of the draws
    assert 0.1 < synthetic_hits(after, new) < 0.4
    assert synthetic_hits(after, old) < synthetic_hits(after, new) / 3  # replaced images are gone from batches


def test_resume_after_a_refresh_equals_the_uninterrupted_run(df_runs):
    from domainfusion_bench import runfiles

    before, resumed, full = df_runs["before"], df_runs["resumed"], df_runs["records"]
    assert [r["step"] for r in before] == [0, 4] and [r["step"] for r in resumed] == [0, 4, 8]
    assert df_runs["killed_refreshes"] == [3] and df_runs["resumed_refreshes"] == [6]  # refresh 1 not redone
    keys = [k for k in full[-1] if k.endswith("_acc") or k in ("loss", "loss_ld", "p_true") or k.startswith("metric_")
            or k in ("cost_generated_images", "cost_nfe")]
    for key in keys:
        assert resumed[-1][key] == pytest.approx(full[-1][key], rel=1e-6, abs=1e-9), key
    a = torch.load(df_runs["root"] / "full" / runfiles.MODEL, weights_only=False)["model_dict"]
    b = torch.load(df_runs["root"] / "killed" / runfiles.MODEL, weights_only=False)["model_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_pool_never_touches_the_held_out_domain(df_runs):
    from domainfusion_bench.data import get_dataset
    from domainfusion_bench.diffusion.cache import MANIFEST
    from domainfusion_bench.protocol import split_indices

    lines = (df_runs["root"] / "data" / ".dfbench_cache" / "generations" / MANIFEST).read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert entries and all(e["source_domain"] in (1, 2, 3) and e["backbone_seen"] == [1, 2, 3] for e in entries)
    assert all(set(e["condition_domains"]) <= {1, 2, 3} for e in entries)
    ds = get_dataset("DigitStyles", "unused")
    sizes, _ = pool_sizes()
    for env, size in zip((1, 2, 3), sizes):  # pool sources: the first images of the (shuffled) in-split
        used = {e["source"]["index"] for e in entries if e["source_domain"] == env}
        assert used == set(split_indices(len(ds.envs[env]), 0, env, 0.2)[1][:size])


def test_a_target_on_the_held_out_domain_is_refused(df_runs, monkeypatch):
    from domainfusion_bench.algorithms.domainfusion import DomainFusion
    from domainfusion_bench.training import train

    algo = DomainFusion((3, 32, 32), 10, 3, {**algorithm_defaults("DomainFusion"), "df_target": "other"})
    targets = [algo._target(env, [1, 2, 3], 4, (0, env, k, 0, 0)) for env in (1, 2, 3) for k in range(50)]
    assert all(set(t) <= {1, 2, 3} for t in targets) and {next(iter(t)) for t in targets} == {1, 2, 3}
    monkeypatch.setattr(DomainFusion, "_target", lambda self, env, train_envs, n, key: {0: 1.0})
    with pytest.raises(DfbenchError, match=r"leakage guard: refusing to condition on held-out domain '\w+' \(index 0\)"):
        train(run_args(df_runs["root"], "leak", steps=1))


def algorithm_defaults(name):
    from domainfusion_bench.algorithms import algorithm_space
    from domainfusion_bench.data import dataset_class

    return algorithm_space(name, dataset_class("DigitStyles")).defaults()


def test_ablation_variants_and_their_hyperparameters(df_runs):
    from domainfusion_bench.algorithms import ALGORITHMS, algorithm_space
    from domainfusion_bench.data import dataset_class
    from domainfusion_bench.training import train

    spaces = {name: algorithm_space(name, dataset_class("DigitStyles"))
              for name in ("DomainFusion", "DomainFusion-LD", "DomainFusion-Aug")}
    names = {k: {n for n in s.names() if n.startswith("df_")} for k, s in spaces.items()}
    assert names["DomainFusion"] == names["DomainFusion-LD"] | names["DomainFusion-Aug"]
    assert "df_ld_weight" in names["DomainFusion-LD"] and "df_pool_fraction" not in names["DomainFusion-LD"]
    assert "DomainFusion-CE" not in ALGORITHMS  # CE only is ERM: no duplicate row
    for seed in range(1, 6):  # random draws are valid settings
        hp = spaces["DomainFusion"].sample(seed, 0)
        ALGORITHMS.get("DomainFusion")((3, 32, 32), 10, 3, hp).check_hparams()
    ld = read(train(run_args(df_runs["root"], "ld", algorithm="DomainFusion-LD", steps=1, checkpoint_freq=1,
                             hparams=json.dumps({"batch_size": 16, "cnn_width": 16, "ddpm_steps": 3}))))
    assert "loss_ld" in ld[-1] and "p_true" in ld[-1] and "cost_generated_images" not in ld[-1]
    assert ld[-1]["cost_reused_diffusion_train_seconds"] > 0  # the shared DDPM of the full run
    bad = ALGORITHMS.get("DomainFusion")((3, 32, 32), 10, 3, {**spaces["DomainFusion"].defaults(), "df_target": "held-out"})
    with pytest.raises(DfbenchError, match="df_target must be one of"):
        bad.check_hparams()


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


def test_the_cost_table_shows_all_denoiser_work_beside_generated_images():
    import pandas as pd

    from domainfusion_bench.tables.costs import _cost_table, cost_frame

    rows = [("CDGA", 2160, 10800, None), ("DomainFusion", 162, 810, 9632), ("ERM", None, None, None)]
    records = pd.DataFrame([{"dataset": "D", "algorithm": a, "run": a, "step": 300, "cost_generated_images": g,
                             "cost_nfe": n, "cost_ld_nfe": ld} for a, g, n, ld in rows])
    costs = cost_frame(records).set_index("algorithm")
    assert costs.loc["DomainFusion", "cost_total_nfe"] == 810 + 9632
    assert costs.loc["CDGA", "cost_total_nfe"] == 10800 and pd.isna(costs.loc["ERM", "cost_total_nfe"])
    table = _cost_table(costs.reset_index(), "D")
    assert table.columns == ["runs", "generated images", "distillation NFEs", "NFEs", "NFEs in all"]
