"""MixStyle and EFDM (EFDMix): the mathematics of the layer, its partners, where it sits, short runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from domainfusion_bench import runfiles
from domainfusion_bench.algorithms import ALGORITHMS, algorithm_space
from domainfusion_bench.data import dataset_class
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.networks.style_mixing import (
    StyleMixing,
    crossdomain_partners,
    efdm_transfer,
    mixstyle_transfer,
    random_partners,
)
from domainfusion_bench.protocol import seed_hash
from domainfusion_bench.training import TrainArgs, resolve_hparams, train

STYLE_ALGORITHMS = ["MixStyle", "EFDM"]


def features(b=6, c=4, h=5, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(b, c, 1, 1, generator=g) * 3 + 0.5
    shift = torch.randn(b, c, 1, 1, generator=g) * 2
    return torch.randn(b, c, h, w, generator=g, dtype=torch.float64) * scale + shift


def reference_mixstyle(x, p, lam, eps=1e-6):
    """MixStyle in numpy, straight from the formula (unbiased variance)."""
    x, p = x.numpy(), p.numpy()
    b, c = x.shape[:2]
    xf, pf = x.reshape(b, c, -1), p.reshape(b, c, -1)
    mu, mu_p = xf.mean(-1, keepdims=True), pf.mean(-1, keepdims=True)
    sig = np.sqrt(xf.var(-1, ddof=1, keepdims=True) + eps)
    sig_p = np.sqrt(pf.var(-1, ddof=1, keepdims=True) + eps)
    lam = np.asarray(lam, dtype=np.float64).reshape(-1, 1, 1)
    out = (lam * sig + (1 - lam) * sig_p) * (xf - mu) / sig + (lam * mu + (1 - lam) * mu_p)
    return torch.from_numpy(out.reshape(x.shape))


def reference_efdm_matched(x, p):
    """Each element of x replaced by p's sorted value at the element's rank within its (sample, channel)."""
    x, p = x.numpy(), p.numpy()
    b, c = x.shape[:2]
    xf, pf = x.reshape(b, c, -1), p.reshape(b, c, -1)
    out = np.empty_like(xf)
    for i in range(b):
        for j in range(c):
            ranks = np.argsort(np.argsort(xf[i, j], kind="stable"), kind="stable")
            out[i, j] = np.sort(pf[i, j])[ranks]
    return torch.from_numpy(out.reshape(x.shape))


# ---------------------------------------------------------------- the mathematics


def test_lambda_one_is_identity():
    x = features()
    partner = x[torch.randperm(len(x))]
    assert torch.allclose(mixstyle_transfer(x, partner, 1.0), x, atol=1e-12, rtol=1e-10)
    assert torch.equal(efdm_transfer(x, partner, 1.0), x)  # exact, not just close


def test_mixstyle_lambda_zero_takes_partner_mean_and_std():
    x = features()
    partner = features(seed=1)
    out = mixstyle_transfer(x, partner, 0.0)
    mu_p = partner.mean((2, 3))
    sigma_p = (partner.var((2, 3)) + 1e-6).sqrt()
    assert torch.allclose(out.mean((2, 3)), mu_p, atol=1e-10)
    # out = sigma_p * x_hat with x_hat's std sqrt(var / (var + eps)); the eps shows at 1e-6 relative
    assert torch.allclose(out.std((2, 3)), sigma_p, rtol=1e-5)
    # and the within-channel pattern is x's (normalised), not the partner's
    x_hat = (x - x.mean((2, 3), keepdim=True)) / (x.var((2, 3), keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(out, x_hat * sigma_p[..., None, None] + mu_p[..., None, None], atol=1e-10)


def test_mixstyle_matches_formula_for_any_lambda():
    x, partner = features(), features(seed=2)
    lam = torch.rand(len(x), dtype=torch.float64)
    assert torch.allclose(mixstyle_transfer(x, partner, lam), reference_mixstyle(x, partner, lam), atol=1e-10)


def test_mixstyle_statistics_are_detached():
    x = features().requires_grad_()
    partner = features(seed=3).requires_grad_()
    lam = torch.full((len(x),), 0.3, dtype=torch.float64)
    g = torch.randn_like(x)
    mixstyle_transfer(x, partner, lam).backward(g)
    assert partner.grad is None or torch.count_nonzero(partner.grad) == 0  # partner enters only through stats
    sigma = (x.detach().var((2, 3), keepdim=True) + 1e-6).sqrt()
    sigma_p = (partner.detach().var((2, 3), keepdim=True) + 1e-6).sqrt()
    ratio = (0.3 * sigma + 0.7 * sigma_p) / sigma  # d out / d x with mu, sigma held constant
    assert torch.allclose(x.grad, g * ratio, atol=1e-10)


def test_efdm_lambda_zero_is_exactly_partner_sorted_at_own_ranks():
    x, partner = features(), features(seed=4)
    out = efdm_transfer(x, partner, 0.0)
    assert torch.equal(out, reference_efdm_matched(x, partner))
    # same per-channel value multiset as the partner, same ordering as x
    assert torch.equal(out.flatten(2).sort(-1).values, partner.flatten(2).sort(-1).values)
    assert torch.equal(out.flatten(2).argsort(-1), x.flatten(2).argsort(-1))


def test_efdm_matches_straight_through_formula_for_any_lambda():
    x, partner = features(), features(seed=5)
    lam = torch.rand(len(x), dtype=torch.float64)
    literal = x + (1 - lam.view(-1, 1, 1, 1)) * (reference_efdm_matched(x, partner) - x)
    assert torch.allclose(efdm_transfer(x, partner, lam), literal, atol=1e-12)


def test_efdm_gradient_is_identity_to_x_and_reaches_partner():
    x = features().requires_grad_()
    partner = features(seed=6).requires_grad_()
    lam = torch.rand(len(x), dtype=torch.float64)
    g = torch.randn_like(x)
    efdm_transfer(x, partner, lam).backward(g)
    assert torch.equal(x.grad, g)  # the straight-through identity
    # partner's k-th smallest value receives (1 - lam) * g at x's k-th smallest position
    b, c = x.shape[:2]
    xf, pf, gf = x.detach().flatten(2), partner.detach().flatten(2), g.flatten(2)
    expected = torch.zeros_like(pf)
    x_order, p_order = xf.argsort(-1), pf.argsort(-1)
    for i in range(b):
        for j in range(c):
            expected[i, j, p_order[i, j]] = (1 - lam[i]) * gf[i, j, x_order[i, j]]
    assert torch.allclose(partner.grad.flatten(2), expected, atol=1e-12)
    assert torch.count_nonzero(partner.grad) > 0


def test_efdm_layer_gradient_reaches_the_partner_sample():
    """Inside the layer the partner is x[perm]: a sample's gradient is g plus what its borrowers send back."""
    torch.manual_seed(0)
    layer = StyleMixing("efdm", p=1.0, alpha=0.1, mix="random").train()
    x = features(b=8).requires_grad_()
    g = torch.randn_like(x)
    layer(x).backward(g)
    perm = layer.last_partners
    lent = torch.zeros(len(x), dtype=torch.bool)
    lent[perm[perm != torch.arange(len(x))]] = True  # lent its values to another sample
    assert lent.any()
    diff = (x.grad - g).flatten(1).abs().sum(1)
    assert torch.all(diff[lent] > 0)


def test_eval_mode_and_p_zero_are_identity():
    x = features(b=8).float()
    for rule in ("mixstyle", "efdm"):
        layer = StyleMixing(rule, p=1.0, mix="random").eval()
        assert layer(x) is x
        layer = StyleMixing(rule, p=0.0, mix="random").train()
        assert layer(x) is x
        layer = StyleMixing(rule, p=1.0, mix="random").train()
        torch.manual_seed(1)
        assert not torch.equal(layer(x), x)


def test_applied_with_probability_p_from_torch_rng():
    x = features(b=8).float()
    layer = StyleMixing("mixstyle", p=0.3, mix="random").train()
    torch.manual_seed(0)
    applied = sum(layer(x) is not x for _ in range(2000))
    assert 0.25 < applied / 2000 < 0.35
    torch.manual_seed(7)
    a = [layer(x) for _ in range(5)]
    torch.manual_seed(7)
    b = [layer(x) for _ in range(5)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))  # the run's seed controls every draw


def test_lambda_is_beta_per_sample():
    layer = StyleMixing("mixstyle", alpha=0.1)
    torch.manual_seed(0)
    lam = layer.sample_lambda(20000)
    assert lam.shape == (20000,)
    assert abs(lam.mean().item() - 0.5) < 0.02  # Beta(a, a) is symmetric
    assert abs(lam.var().item() - 1 / (4 * (2 * 0.1 + 1))) < 0.01  # var = 1 / (4 (2a + 1))
    assert ((lam < 0.1) | (lam > 0.9)).float().mean() > 0.6  # alpha 0.1: mostly near 0 or 1


# ---------------------------------------------------------------- partners


@pytest.mark.parametrize("sizes", [[8, 8], [8, 8, 8], [6, 6, 6, 6], [5, 7, 3], [1, 4], [1, 1, 1], [2, 9]])
def test_crossdomain_never_pairs_one_domain(sizes):
    torch.manual_seed(0)
    domains = torch.cat([torch.full((n,), d) for d, n in enumerate(sizes)])
    domains = domains[torch.randperm(len(domains))]  # order of the batch must not matter
    for _ in range(20):
        partner = crossdomain_partners(domains)
        assert partner.shape == domains.shape and partner.dtype == torch.long
        assert partner.min() >= 0 and partner.max() < len(domains)
        assert torch.all(domains[partner] != domains)


def test_crossdomain_pairs_half_of_domain_i_with_half_of_domain_i_plus_1():
    torch.manual_seed(0)
    domains = torch.arange(3).repeat_interleave(8)
    partner = crossdomain_partners(domains)
    assert torch.equal(partner[partner], torch.arange(24))  # mutual pairs
    for d in range(3):
        towards = domains[partner[domains == d]]
        assert (towards == (d + 1) % 3).sum() == 4 and (towards == (d - 1) % 3).sum() == 4


def test_crossdomain_with_one_domain_falls_back_to_a_permutation():
    torch.manual_seed(0)
    partner = crossdomain_partners(torch.zeros(10, dtype=torch.long))
    assert torch.equal(partner.sort().values, torch.arange(10))
    assert torch.equal(random_partners(10).sort().values, torch.arange(10))


def test_layer_uses_the_domains_it_is_told():
    layer = StyleMixing("efdm", p=1.0, mix="crossdomain").train()
    x = features(b=12).float()
    domains = torch.tensor([0, 1, 2] * 4)
    with pytest.raises(DfbenchError, match="for_domains"):
        layer(x)
    with pytest.raises(DfbenchError, match="12 samples"):
        with layer.for_domains(domains[:6]):
            layer(x)
    torch.manual_seed(0)
    for _ in range(10):
        with layer.for_domains(domains):
            layer(x)
        assert torch.all(domains[layer.last_partners] != domains)
    assert layer._domains is None  # the context restores the previous state


def test_bad_layer_settings_are_named():
    with pytest.raises(DfbenchError, match="mixstyle, efdm"):
        StyleMixing("adain")
    with pytest.raises(DfbenchError, match="random, crossdomain"):
        StyleMixing("efdm", mix="shuffle")


# ---------------------------------------------------------------- algorithms


def build(algorithm, dataset="DigitStyles", **overrides):
    args = TrainArgs(dataset=dataset, algorithm=algorithm, hparams=json.dumps(overrides) if overrides else None)
    hparams = resolve_hparams(args)
    cls = dataset_class(dataset)
    return ALGORITHMS.get(algorithm)(cls.input_shape, cls.num_classes, 3, hparams)


def mixer_inputs(algorithm, x):
    """Shapes the shared mixer sees in one training forward pass (p = 1)."""
    seen = []
    handle = algorithm.mixer.register_forward_pre_hook(lambda m, inp: seen.append(tuple(inp[0].shape)))
    algorithm.train()
    domains = torch.arange(3).repeat_interleave(len(x) // 3)
    with algorithm.mixer.for_domains(domains):
        algorithm.predict(x)
    handle.remove()
    return seen


@pytest.mark.parametrize("name", STYLE_ALGORITHMS)
def test_defaults_and_small_cnn_insertion(name):
    algorithm = build(name, mix_p=1.0)
    hp = algorithm.hparams
    assert (hp["mix_alpha"], hp["mix_mode"], hp["mix_stages"]) == (0.1, "crossdomain", "auto")
    assert build(name).hparams["mix_p"] == 0.5
    assert algorithm.mixer.rule == {"MixStyle": "mixstyle", "EFDM": "efdm"}[name]
    inserted = algorithm.featurizer.inserted
    assert list(inserted) == ["block1", "block2"]
    assert all(layer is algorithm.mixer for layer in inserted.values())  # one shared instance
    width = hp["cnn_width"]
    assert mixer_inputs(algorithm, torch.rand(6, 3, 32, 32)) == [(6, width // 2, 32, 32), (6, width, 16, 16)]

    other = build(name, mix_stages="block3,block4")
    assert list(other.featurizer.inserted) == ["block3", "block4"]
    assert list(build(name, mix_stages=["block2"]).featurizer.inserted) == ["block2"]
    with pytest.raises(DfbenchError, match="block1, block2, block3, block4"):
        build(name, mix_stages="layer1")


@pytest.mark.parametrize("name", STYLE_ALGORITHMS)
def test_resnet18_insertion_after_layer1_to_3(name):
    algorithm = build(name, backbone="resnet18", pretrained="none", mix_p=1.0)
    assert list(algorithm.featurizer.inserted) == ["layer1", "layer2", "layer3"]
    seen = mixer_inputs(algorithm, torch.rand(6, 3, 64, 64))
    assert seen == [(6, 64, 16, 16), (6, 128, 8, 8), (6, 256, 4, 4)]
    only = build(name, backbone="resnet18", pretrained="none", mix_stages="layer2")
    assert list(only.featurizer.inserted) == ["layer2"]


def test_resnet50_default_is_layer1_and_2():
    algorithm = build("EFDM", backbone="resnet50", pretrained="none")
    assert list(algorithm.featurizer.inserted) == ["layer1", "layer2"]


@pytest.mark.parametrize("name", STYLE_ALGORITHMS)
def test_update_tells_the_layer_each_sample_domain(name):
    torch.manual_seed(0)
    algorithm = build(name, mix_p=1.0)
    algorithm.setup_optimizers()
    told, partners = [], []

    def record(module, inputs, output):
        told.append(module._domains.clone())
        partners.append(module.last_partners.clone())

    algorithm.mixer.register_forward_hook(record)
    minibatches = [(torch.rand(4, 3, 32, 32), torch.randint(10, (4,))) for _ in range(3)]
    algorithm.update(minibatches)
    expected = torch.arange(3).repeat_interleave(4)
    assert len(told) == 2  # block1 and block2
    for domains, partner in zip(told, partners):
        assert torch.equal(domains, expected)
        assert torch.all(expected[partner] != expected)
    assert algorithm.mixer._domains is None


# ---------------------------------------------------------------- runs and hyperparameters


@pytest.mark.parametrize("name", STYLE_ALGORITHMS)
def test_short_run_on_digitstyles_writes_records(name, tmp_path):
    out = tmp_path / name
    args = TrainArgs(dataset="DigitStyles", algorithm=name, test_envs=[1], output_dir=str(out), steps=12,
                     checkpoint_freq=5, device="cpu", num_workers=0, skip_model_save=True,
                     hparams=json.dumps({"batch_size": 8}))
    train(args)
    assert (out / runfiles.DONE).exists()
    records = [json.loads(line) for line in (out / runfiles.RESULTS).read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 5, 10, 11]
    last = records[-1]
    assert last["args"]["algorithm"] == name
    assert last["hparams"]["mix_mode"] == "crossdomain" and last["hparams"]["batch_size"] == 8
    assert np.isfinite(last["loss"])
    for key in ("env1_in_acc", "env1_out_acc", "env0_out_acc", "env2_out_acc", "env3_out_acc"):
        assert 0.0 <= last[key] <= 1.0


def domainbed_draw(hparams_seed, trial_seed, name, sample):
    return sample(np.random.RandomState(seed_hash(seed_hash(hparams_seed, trial_seed), name)))


@pytest.mark.parametrize("dataset", ["DigitStyles", "PACS"])
def test_hparam_draws_stable_and_searched(dataset):
    cls = dataset_class(dataset)
    erm = algorithm_space("ERM", cls)
    small = cls.SMALL_IMAGES
    stage_choices = (["block1", "block1,block2", "block1,block2,block3"] if small
                     else ["layer1", "layer1,layer2", "layer1,layer2,layer3"])
    for name in STYLE_ALGORITHMS:
        space = algorithm_space(name, cls)
        for hseed in range(1, 6):
            for tseed in range(3):
                ours, base = space.sample(hseed, tseed), erm.sample(hseed, tseed)
                for key in erm.names():
                    assert ours[key] == base[key], (name, key)
                lr_range = (-4.5, -2.5) if small else (-5, -3.5)
                assert ours["lr"] == domainbed_draw(hseed, tseed, "lr", lambda r: 10 ** r.uniform(*lr_range))
                assert 0.2 <= ours["mix_p"] <= 0.8 and 0.01 <= ours["mix_alpha"] <= 1.0
                assert ours["mix_stages"] in stage_choices and ours["mix_mode"] == "crossdomain"
        draws = {space.sample(h, 0)["mix_stages"] for h in range(1, 30)}
        assert draws == set(stage_choices)
