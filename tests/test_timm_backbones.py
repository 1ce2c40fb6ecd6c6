"""timm backbones and the DiTi-encoder featurizer: built from configs, trained, resumed, weights loaded,
style mixing at timm stages. Tiny configs (depth 1, a few channels) so each test takes seconds."""

from __future__ import annotations

import json

import pytest
import torch

from domainfusion_bench.algorithms import ALGORITHMS
from domainfusion_bench.data.synthetic import generate
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.networks import build_featurizer
from domainfusion_bench.training import TrainArgs, train

pytest.importorskip("timm")

VIT = "timm:vit_tiny_patch16_224?patch_size=32&depth=1&embed_dim=32&num_heads=2"
CONVNEXT = "timm:convnext_tiny?depths=[1,1,1,1]&dims=[8,16,16,16]"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate(root / "synthetic_pacs", per_class=2)
    return root


def _args(data_dir, out, backbone, steps=2, **hp):
    return TrainArgs(dataset="synthetic-pacs", data_dir=str(data_dir), test_envs=[0], steps=steps, checkpoint_freq=1,
                     output_dir=str(out), device="cpu", num_workers=0,
                     hparams=json.dumps({"backbone": backbone, "pretrained": "none", "batch_size": 2, **hp}))


def _records(run):
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backbone", [VIT, CONVNEXT], ids=["vit", "convnext"])
def test_timm_backbone_trains_and_resumes(data_dir, tmp_path, backbone, monkeypatch):
    from domainfusion_bench import runfiles

    whole = train(_args(data_dir, tmp_path / "whole", backbone, steps=3))
    part = _args(data_dir, tmp_path / "part", backbone, steps=3)
    beats, real = [], runfiles.heartbeat

    def crash_on_second_checkpoint(run_dir):  # after step 1's record and resume point, as a kill would
        real(run_dir)
        beats.append(1)
        if len(beats) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(runfiles, "heartbeat", crash_on_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(part)
    monkeypatch.setattr(runfiles, "heartbeat", real)
    resumed = train(part)
    a, b = _records(whole), _records(resumed)
    assert [r["step"] for r in b] == [0, 1, 2]
    keys = [k for k in a[-1] if k.endswith("_acc") or k == "loss"]
    assert [a[-1][k] for k in keys] == pytest.approx([b[-1][k] for k in keys], abs=1e-6)
    described = b[-1]["args"]["protocol"]["featurizer"]
    assert described["backbone"] == backbone.split("?")[0] and described["pretrained"] == "none"
    # the model's own pretrained config: ViT-Tiny normalises with 0.5, ConvNeXt with ImageNet's statistics
    assert described["data_config"]["mean"] == pytest.approx([0.5] * 3 if "vit" in backbone else [0.485, 0.456, 0.406])


def test_inputs_are_renormalised_to_the_model_config():
    feat = build_featurizer((3, 32, 32), {"backbone": "timm:vit_tiny_patch16_224?img_size=32&patch_size=16&depth=1"
                                                      "&embed_dim=32&num_heads=2", "pretrained": "none"})
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    feat.set_input_normalization(imagenet)
    seen = []
    feat.model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
    x01 = torch.rand(2, 3, 32, 32)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in imagenet)
    feat((x01 - mean) / std)
    assert torch.allclose(seen[0], (x01 - 0.5) / 0.5, atol=1e-5)  # what the model's config asks for


def test_weights_from_a_local_file_folder_and_cache_load(tmp_path, monkeypatch):
    spec = "timm:convnext_tiny?depths=[1,1,1,1]&dims=[8,16,16,16]"
    source = build_featurizer((3, 32, 32), {"backbone": spec, "pretrained": "none"})
    torch.save(source.model.state_dict(), tmp_path / "w.pth")
    from safetensors.torch import save_file

    (tmp_path / "hub").mkdir()
    save_file(source.model.state_dict(), tmp_path / "hub" / "model.safetensors")
    for where in (tmp_path / "w.pth", tmp_path / "hub"):
        loaded = build_featurizer((3, 32, 32), {"backbone": spec, "pretrained": str(where)})
        for (name, p), q in zip(source.model.state_dict().items(), loaded.model.state_dict().values()):
            assert torch.equal(p, q), (where, name)
    fresh = build_featurizer((3, 32, 32), {"backbone": spec, "pretrained": "none"})
    # pretrained "imagenet": the file found in the Hugging Face cache already on disk (hub layout, no download)
    repo = tmp_path / "hf" / "models--timm--convnext_tiny.in12k_ft_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    save_file(source.model.state_dict(), repo / "snapshots" / "abc123" / "model.safetensors")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    cached = build_featurizer((3, 32, 32), {"backbone": spec, "pretrained": "imagenet"})
    assert torch.equal(cached.model.stem[0].weight, source.model.stem[0].weight)
    assert cached.describe()["weights"] == str(repo / "snapshots" / "abc123" / "model.safetensors")
    assert not torch.equal(fresh.model.stem[0].weight, source.model.stem[0].weight)  # the load did something


def test_missing_weights_are_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(DfbenchError, match="no pretrained weights for timm:convnext_tiny on this machine") as err:
        build_featurizer((3, 32, 32), {"backbone": "timm:convnext_tiny", "pretrained": "imagenet"})
    assert '"pretrained": "none"' in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DfbenchError, match="timm has no model 'convnxt_tiny'"):
        build_featurizer((3, 32, 32), {"backbone": "timm:convnxt_tiny", "pretrained": "none"})
    with pytest.raises(DfbenchError, match=r"takes \(224, 224\) px images but the dataset gives \(32, 32\): use "
                                           r"backbone timm:vit_tiny_patch16_224\?img_size=32"):
        build_featurizer((3, 32, 32), {"backbone": "timm:vit_tiny_patch16_224?depth=1", "pretrained": "none"})
    with pytest.raises(DfbenchError, match="do not exist"):
        build_featurizer((3, 32, 32), {"backbone": "timm:convnext_tiny", "pretrained": str(tmp_path / "nope.pth")})


def _mixstyle(backbone, **hp):
    cls = ALGORITHMS.get("MixStyle")
    from domainfusion_bench.data import dataset_class
    from domainfusion_bench.hparams import apply_overrides
    from domainfusion_bench.algorithms import algorithm_space

    space = algorithm_space("MixStyle", dataset_class("synthetic-pacs"))
    hparams = apply_overrides(space.defaults(), {"backbone": backbone, "pretrained": "none", **hp}, "test")
    return cls((3, 32, 32), 7, 3, hparams)


def test_mixstyle_on_a_timm_cnn_mixes_at_the_named_stages():
    algo = _mixstyle(CONVNEXT, mix_stages="stages.1,stages.2", mix_p=1.0, mix_mode="random")
    stages = algo.featurizer.model.stages
    outputs, inputs = {}, {}
    for i in range(4):
        # prepend: sees the stage's own output, before the mixing hook replaces it
        stages[i].register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out), prepend=True)
        stages[i].register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
    algo.train()
    torch.manual_seed(0)
    algo.predict(torch.randn(6, 3, 32, 32))
    # after a mixing stage the next stage reads something else than the stage gave; elsewhere the same
    assert torch.equal(inputs[1], outputs[0])
    assert not torch.equal(inputs[2], outputs[1]) and not torch.equal(inputs[3], outputs[2])
    assert algo.mix_stages == ["stages.1", "stages.2"]
    assert _mixstyle(CONVNEXT).mix_stages == ["stages.0", "stages.1"]  # auto: the first half


def test_mixstyle_on_a_vit_is_one_clear_error():
    with pytest.raises(DfbenchError, match=r"MixStyle/EFDM mix per-channel statistics of feature maps \[B, C, H, W\]"):
        _mixstyle("timm:vit_tiny_patch16_224?img_size=32&patch_size=16&depth=2&embed_dim=32&num_heads=2")
    with pytest.raises(DfbenchError, match="has none. Use backbone cnn"):
        _mixstyle("diti_encoder?width=8&z_dim=16")


def test_diti_encoder_is_a_featurizer_for_any_algorithm():
    feat = build_featurizer((3, 28, 28), {"backbone": "diti_encoder?width=8&z_dim=64"})
    from domainfusion_bench.diffusion.diti import DiTiEncoder

    assert isinstance(feat.encoder, DiTiEncoder) and feat.n_outputs == 64 and feat(torch.zeros(2, 3, 28, 28)).shape == (2, 64)
    erm = ALGORITHMS.get("ERM-DiTiEnc")
    from domainfusion_bench.algorithms import algorithm_space
    from domainfusion_bench.data import dataset_class

    space = algorithm_space("ERM-DiTiEnc", dataset_class("DigitStyles"))
    algo = erm((3, 28, 28), 10, 3, {**space.defaults(), "diti_encoder_width": 8})
    assert isinstance(algo.featurizer.encoder, DiTiEncoder) and algo.featurizer.encoder.net[0].out_channels == 8
    with pytest.raises(DfbenchError, match="takes no \\?options"):
        build_featurizer((3, 28, 28), {"backbone": "cnn?width=3"})


def test_bench_takes_a_timm_backbone(data_dir):
    from domainfusion_bench.bench import BenchOptions, run_bench

    opts = BenchOptions(dataset="synthetic-pacs", backbone=VIT, resolution=None, batch_size=2, steps=1, warmup=0,
                        device="cpu", data_dir=str(data_dir), num_workers=0, threads=1)
    (fast,) = run_bench(opts)["profiles"]
    assert fast["backbone"] == VIT and fast["train_images_per_s"] > 0 and fast["eval_images_per_s"] > 0


def test_building_the_image_store_leaves_the_runs_initialisation_alone(tmp_path):
    generate(tmp_path / "data" / "synthetic_pacs", per_class=1)
    losses = []
    for name in ("builds_store", "finds_store"):
        args = TrainArgs(dataset="synthetic-pacs", data_dir=str(tmp_path / "data"), test_envs=[0], steps=1,
                         output_dir=str(tmp_path / name), device="cpu", num_workers=0, skip_model_save=True,
                         hparams=json.dumps({"backbone": "cnn", "cnn_width": 16, "batch_size": 2}))
        losses.append(_records(train(args))[0]["loss"])
    assert losses[0] == losses[1]
