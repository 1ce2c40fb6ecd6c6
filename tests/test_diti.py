"""DiTi: block and stage rules, c_t and lambda_t, the zero branch, pre-training against a frozen model,
and DiTi runs (probe / finetune / subset) on DigitStyles with their pre-training cost and the probe report."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from domainfusion_bench import runfiles
from domainfusion_bench.costs import CostMeter
from domainfusion_bench.algorithms.diti import parse_blocks, probe_report, split_images, z_slice
from domainfusion_bench.data import get_dataset
from domainfusion_bench.diffusion import diti
from domainfusion_bench.diffusion.backbones import PixelDDPMBackbone, PixelDDPMConfig
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.training import TrainArgs, train


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def test_block_index_and_stage_end_dims():
    blocks = diti.block_index(1000, 64)
    assert blocks[[0, 15, 16, 31, 32, 999]].tolist() == [0, 0, 1, 1, 2, 63]
    ends = diti.block_end_dims(1000, 64, 512)
    assert len(ends) == 64 and ends == sorted(ends)
    assert [ends[b] for b in (3, 6, 19, 31, 63)] == [10, 35, 362, 462, 512]
    # inside a stage: floor(stage dims / its blocks) per block, e.g. 327 dims over blocks 7..19 -> 25 each
    assert ends[:3] == [2, 4, 6] and ends[7] - ends[6] == 25 and ends[20] - ends[19] == 100 // 12
    assert diti.block_end_dims(1000, 64, 512, "uniform") == [8 * (b + 1) for b in range(64)]
    assert sum(diti.scaled_dims(diti.DIMS_PER_STAGE, 64)) == 64 and diti.block_end_dims(1000, 64, 64)[-1] == 64
    with pytest.raises(DfbenchError, match="allocation"):
        diti.block_end_dims(1000, 64, 512, "even")
    with pytest.raises(DfbenchError, match="hold no block"):
        diti.block_end_dims(1000, 4, 512)  # blocks start at 0, 250, 500, 750: stages 50-100 and 100-300 are empty


@pytest.mark.parametrize("allocation", ["stages", "uniform"])
def test_every_block_mask_is_a_prefix(allocation):
    ends = diti.block_end_dims(1000, 64, 512, allocation)
    visible, new = diti.prefix_masks(ends, 512)
    for b, end in enumerate(ends):
        assert visible[b].tolist() == [1.0] * end + [0.0] * (512 - end)
        start = ends[b - 1] if b else 0
        assert new[b].nonzero().flatten().tolist() == list(range(start, end))
    assert torch.equal(new.sum(0), torch.ones(512))  # every dim is new in exactly one block


def test_shift_coefficient_and_loss_weight_by_hand():
    betas = [0.1, 0.2, 0.3]
    abar = torch.tensor([0.9, 0.72, 0.504])  # cumulative products of 1 - beta
    c, w = diti.shift_coefficient(abar), diti.loss_weight(abar)
    assert c[0].item() == 0.0  # abar_{-1} = 1
    assert c[1].item() == pytest.approx(-math.sqrt(0.8) * (1 - 0.9) / math.sqrt(1 - 0.72), rel=1e-6)
    assert c[2].item() == pytest.approx(-math.sqrt(0.7) * (1 - 0.72) / math.sqrt(1 - 0.504), rel=1e-6)
    snr = 0.72 / 0.28
    assert w[1].item() == pytest.approx(snr**0.1 / (1 + snr), rel=1e-6)
    # the reference's linear schedule (1e-4 .. 0.02 over 1000 steps; our pixel DDPM's is cosine, see the stage edges)
    from diffusers import DDPMScheduler

    beta = [1e-4 + (0.02 - 1e-4) * t / 999 for t in range(1000)]
    ab = [1.0]
    for b in beta:
        ab.append(ab[-1] * (1 - b))
    table = torch.tensor(ab[1:], dtype=torch.float64)
    assert torch.allclose(DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod.double(),
                          table, atol=1e-6)
    for t in (1, 10, 500, 999):
        expect_c = -math.sqrt(1 - beta[t]) * (1 - ab[t]) / math.sqrt(1 - ab[t + 1])
        snr = ab[t + 1] / (1 - ab[t + 1])
        assert diti.shift_coefficient(table)[t].item() == pytest.approx(expect_c, rel=1e-5)
        assert diti.loss_weight(table)[t].item() == pytest.approx(snr**0.1 / (1 + snr), rel=1e-5)


def test_stage_edges_match_the_reference_alpha_bar():
    """Each reference edge t moves to the first t of our schedule whose abar is at or below the reference's
    abar_t: the identity on the reference's own linear schedule, (104, 203, 564, 818, 1000) on the cosine one."""
    from diffusers import DDPMScheduler

    reference = diti.reference_alphas_cumprod()
    assert torch.allclose(DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double(), reference, atol=1e-6)
    assert diti.stage_edges(reference) == list(diti.STAGES)
    cosine = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    edges = diti.stage_edges(cosine)
    assert edges == [104, 203, 564, 818, 1000]
    for ours, ref in zip(edges[:-1], diti.STAGES):
        assert cosine[ours] <= reference[ref] < cosine[ours - 1]
    assert tiny_backbone().alphas_cumprod.double().allclose(cosine, atol=1e-6)  # our pixel DDPM's schedule
    objective = diti.DiTiObjective(tiny_backbone(), diti.DiTiConfig())
    # the stage allocation on those edges: 7 / 6 / 24 / 16 / 11 blocks of 64 share 10 / 25 / 327 / 100 / 50 dims
    ends = diti.block_end_dims(1000, 64, 512, stages=edges)
    assert objective.stage_edges == edges and objective.end_dims == ends
    assert [ends[b] for b in (6, 12, 36, 52, 63)] == [10, 35, 362, 462, 512] and ends[7] - ends[6] == 25 // 6
    with pytest.raises(DfbenchError, match="reference time steps"):
        diti.stage_edges(cosine, (50, 100, 1200))


def tiny_backbone(resolution=16, channels=1, seed=0):
    """A fixed random eps-model standing in for the frozen DDPM."""
    torch.manual_seed(seed)
    config = PixelDDPMConfig(resolution=resolution, patch_size=2, block_out_channels=(8, 16), prediction="epsilon")
    return PixelDDPMBackbone.create(config, dataset="RotatedDigits", domains=list("abcdef"),
                                    classes=[str(i) for i in range(10)], image_channels=channels, key="tiny").eval()


def test_untrained_branch_reproduces_the_frozen_eps_exactly():
    backbone = tiny_backbone()
    objective = diti.DiTiObjective(backbone, diti.DiTiConfig(z_dim=64))
    branch = diti.ShiftBranch(backbone.latent_shape(), 64, 16)
    z_t, t = torch.randn(5, 1, 16, 16), torch.tensor([0, 1, 300, 700, 999])
    frozen = backbone.eps(z_t, t, backbone.null_condition(5))
    assert torch.equal(objective.eps_hat(branch, z_t, t, torch.randn(5, 64)), frozen)


def test_pretraining_lowers_the_loss_and_leaves_the_frozen_model_untouched():
    ds = get_dataset("RotatedDigits", None)
    images, _, domains = split_images(ds, [1, 2, 3], 0, 0.2, "in", 16)
    assert set(domains.tolist()) == {0, 1, 2}
    backbone = tiny_backbone()
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    config = diti.DiTiConfig(z_dim=64, encoder_width=16, branch_width=16, steps=150, batch_size=16, lr=2e-3)
    encoder, branch, info = diti.pretrain_diti(backbone, images, config, progress=False, encoder_res=16)
    assert info["eval_loss"] < 0.9 * info["eval_frozen_loss"]
    after = backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_bad_settings_are_clear_errors():
    assert parse_blocks("32-63", 64) == (32, 63) and parse_blocks("5", 64) == (5, 5)
    for bad in ("63-32", "x", "0-64"):
        with pytest.raises(DfbenchError, match="diti_blocks"):
            parse_blocks(bad, 64)
    with pytest.raises(DfbenchError, match="grad_mode"):
        diti.DiTiConfig(grad_mode="sometimes")
    hp = {"diti_mode": "subset", "diti_blocks": "stage:4", "diti_z_dim": 512, "diti_k": 64, "diti_allocation": "stages",
          "diffusion_backbone": "pixel_ddpm"}
    assert z_slice(hp) == (462, 512) == z_slice({**hp, "diti_blocks": "53-63"})  # cosine: stage 4 is t >= 818
    assert z_slice({**hp, "diti_blocks": "32-63"}, diti.reference_alphas_cumprod()) == (462, 512)  # linear: t >= 500
    assert z_slice({**hp, "diti_blocks": "32-63"})[0] < 462
    with pytest.raises(DfbenchError, match="stage:0 .. stage:4"):
        z_slice({**hp, "diti_blocks": "stage:5"})
    with pytest.raises(DfbenchError, match="diti_mode"):
        z_slice({**hp, "diti_mode": "linear"})


# --- end to end on DigitStyles: tiny DDPM, tiny encoder, a few steps ------------------------------------------
FAST = {"batch_size": 8, "ddpm_steps": 2, "sample_steps": 2, "diti_steps": 4, "diti_z_dim": 64, "diti_encoder_width": 8,
        "diti_branch_width": 8, "diti_batch_size": 8}


def read(run_dir):
    return [json.loads(line) for line in (run_dir / runfiles.RESULTS).read_text().splitlines()]


@pytest.fixture(scope="module")
def diti_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("diti")
    common = dict(dataset="DigitStyles", test_envs=[0], steps=3, checkpoint_freq=2, data_dir=str(root / "data"),
                  num_workers=0, device="cpu")
    runs = {}
    for mode in ("probe", "finetune", "subset"):
        out = root / mode
        hparams = {**FAST, "diti_mode": mode, "diti_probe_metrics": mode == "subset"}
        train(TrainArgs(algorithm="DiTi", output_dir=str(out), hparams=json.dumps(hparams), **common))
        runs[mode] = out
    return root, runs


def test_diti_runs_in_each_mode_record_the_pretraining_cost(diti_runs):
    root, runs = diti_runs
    cached = list((root / "data" / ".dfbench_cache" / "models" / "diti_encoder").glob("*/meta.json"))
    assert len(cached) == 1  # one encoder for the three runs: same training domains, trial and config
    meta = json.loads(cached[0].read_text())
    sizes = get_dataset("DigitStyles", None).sizes()
    assert meta["identity"]["seen_envs"] == [1, 2, 3]  # the leakage guard reads this
    # in-splits only: the images in the in-split of every trial seed that shares the encoder (0-2)
    from domainfusion_bench.diffusion.trainer import SHARED_TRIALS, training_indices
    assert meta["info"]["n_images"] == sum(len(training_indices(sizes[e], e, 0, 0.2, SHARED_TRIALS)) for e in (1, 2, 3))
    assert meta["info"]["n_images"] < sum(sizes[e] - int(sizes[e] * 0.2) for e in (1, 2, 3))
    weights = load_file(str(cached[0].parent / "weights.safetensors"))
    encoder_file = {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
    for mode, run in runs.items():
        records = read(run)
        assert [r["step"] for r in records] == [0, 2] and (run / runfiles.DONE).exists()
        last = records[-1]
        assert last["cost_diti_train_seconds"] == pytest.approx(meta["train_seconds"]) and last["cost_diti_train_seconds"] > 0
        assert ("cost_reused_diti_train_seconds" in last) == (mode != "probe")  # the first run trained it
        assert last["metric_diti_eval_loss"] == pytest.approx(meta["info"]["eval_loss"])
        assert last["cost_diffusion_train_seconds"] > 0
        model = torch.load(run / runfiles.MODEL, weights_only=False)["model_dict"]
        enc = {k[len("featurizer.encoder."):]: v for k, v in model.items() if k.startswith("featurizer.encoder.")}
        same = all(torch.equal(enc[k], encoder_file[k]) for k in encoder_file)
        assert same == (mode != "finetune")  # probe and subset keep z frozen; finetune trains the encoder
    # finetune: one frozen-DDPM call per image of the DiTi loss, 3 steps x 3 domains x 8 images (pre-training is
    # the cached encoder's cost); probe and subset call it never
    finetuned = read(runs["finetune"])[-1]
    assert finetuned["cost_diti_frozen_nfe"] == finetuned["cost_nfe"] == 3 * 3 * FAST["batch_size"]
    assert "cost_nfe" not in read(runs["probe"])[-1] and "cost_diti_frozen_nfe" not in read(runs["subset"])[-1]
    assert "diti_loss" in read(runs["finetune"])[-1] and any(k.startswith("branch.") for k in
                                                             torch.load(runs["finetune"] / runfiles.MODEL, weights_only=False)["model_dict"])
    probed = read(runs["subset"])[-1]
    assert 0 <= probed["metric_diti_class_acc_t500_1000"] <= 1 and 0 <= probed["metric_diti_domain_acc_all"] <= 1
    assert "metric_diti_class_acc_all" not in read(runs["probe"])[-1]
    subset = torch.load(runs["subset"] / runfiles.MODEL, weights_only=False)["model_dict"]
    hp = read(runs["subset"])[-1]["hparams"]
    assert subset["classifier.weight"].shape[1] == 64 - z_slice(hp)[0] and hp["diti_blocks"] == "stage:4"


def test_probe_report_reuses_the_encoder_and_scores_every_slice(diti_runs, tmp_path):
    root, _ = diti_runs
    out = tmp_path / "probe.json"
    rows = probe_report("DigitStyles", str(root / "data"), [0], hparams_json=json.dumps(FAST), json_out=out)
    assert len(list((root / "data" / ".dfbench_cache" / "models" / "diti_encoder").glob("*/meta.json"))) == 1
    # the reference's stages, moved onto the pixel DDPM's cosine schedule by alpha-bar
    assert [r["slice"] for r in rows][:5] == ["t 0-104", "t 104-203", "t 203-564", "t 564-818", "t 818-1000"]
    assert [r["ref"] for r in rows][:5] == ["0-50", "50-100", "100-300", "300-500", "500-1000"]
    assert rows[-1]["dims"] == "0-64" and all(0 <= r["class_acc"] <= 1 and 0 <= r["domain_acc"] <= 1 for r in rows)
    assert json.loads(out.read_text())["rows"][0]["n_dims"] == rows[0]["n_dims"]


def test_finetune_diti_loss_reads_an_even_stride_of_the_minibatch():
    from domainfusion_bench.algorithms import ALGORITHMS, algorithm_space
    from domainfusion_bench.data import dataset_class

    hp = {**algorithm_space("DiTi-finetune", dataset_class("DigitStyles")).defaults(), **FAST, "diti_finetune_batch": 4}
    algo = ALGORITHMS.get("DiTi-finetune")((3, 32, 32), 10, 3, hp)
    seen = []

    class Recorder:
        nfe = 0

        def loss(self, encoder, branch, x):
            seen.append(x.clone())
            self.nfe += len(x)  # one frozen-model call per image, as DiTiObjective counts them
            return torch.zeros((), requires_grad=True), 0.0

    algo.objective = Recorder()
    algo._context = SimpleNamespace(costs=CostMeter())
    x = torch.arange(12.0).view(12, 1, 1, 1).expand(12, 3, 32, 32)  # 3 domains x 4 images, tagged by value
    minibatches = [(x[4 * d:4 * d + 4], torch.zeros(4, dtype=torch.long)) for d in range(3)]
    algo.loss(minibatches)
    tags = algo.featurizer.unit(x)[:, 0, 0, 0]
    assert torch.equal(seen[-1][:, 0, 0, 0], tags[::3])  # 4 of 12: images 0, 3, 6, 9 -> every domain is in it
    assert algo._context.costs.totals == {"nfe": 4, "diti_frozen_nfe": 4}  # charged as the images it read
    algo.hparams["diti_finetune_batch"] = 0
    algo.loss(minibatches)
    assert len(seen[-1]) == 12 and algo._context.costs.totals["diti_frozen_nfe"] == 16
