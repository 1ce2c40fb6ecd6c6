"""CDGA end to end on DigitStyles with a briefly trained pixel DDPM: generation, records with costs,
resume without regenerating or retraining, the CDGA* oracle sharing the caches, and the CLI."""

import json

import pytest
import torch

from domainfusion_bench import runfiles
from domainfusion_bench.data import get_dataset
from domainfusion_bench.diffusion import samplers, trainer
from domainfusion_bench.diffusion.cache import MANIFEST
from domainfusion_bench.protocol import split_indices
from domainfusion_bench.training import TrainArgs, train

# 3 DDPM steps, 12 sources per domain, img2img over 2 DDIM steps: seconds on a CPU, the whole path still runs
SOURCES = 12
FAST = {"batch_size": 16, "cnn_width": 16, "ddpm_steps": 3, "cdga_strength": 0.2, "cdga_max_sources": SOURCES,
        "og_judge_steps": 5}


def read(run_dir):
    return [json.loads(line) for line in (run_dir / runfiles.RESULTS).read_text().splitlines()]


@pytest.fixture(scope="module")
def cdga_runs(tmp_path_factory):
    """A CDGA run killed after its second checkpoint and resumed, then a CDGA* run on the same caches."""
    root = tmp_path_factory.mktemp("cdga")
    common = dict(dataset="DigitStyles", test_envs=[0], steps=21, checkpoint_freq=10, data_dir=str(root / "data"),
                  hparams=json.dumps(FAST), num_workers=0, device="cpu", skip_model_save=True)
    mp = pytest.MonkeyPatch()
    real_heartbeat = runfiles.heartbeat
    beats = []

    def crash_on_second_checkpoint(run_dir):
        real_heartbeat(run_dir)
        if (run_dir / runfiles.RESUME).exists():  # a checkpoint's beat, not a pre-stage's
            beats.append(run_dir)
        if len(beats) == 2:
            raise KeyboardInterrupt("killed")

    mp.setattr(runfiles, "heartbeat", crash_on_second_checkpoint)
    run = root / "cdga"
    with pytest.raises(KeyboardInterrupt):
        train(TrainArgs(algorithm="CDGA", output_dir=str(run), **common))
    before = read(run)
    mp.setattr(runfiles, "heartbeat", real_heartbeat)

    def must_not_run(*a, **k):
        raise AssertionError("the resumed run trained the DDPM or generated again")

    mp.setattr(trainer, "_train", must_not_run)
    mp.setattr(samplers.DDIMSampler, "img2img", must_not_run)
    train(TrainArgs(algorithm="CDGA", output_dir=str(run), **common))
    mp.undo()
    oracle = root / "oracle"
    train(TrainArgs(algorithm="CDGA*", output_dir=str(oracle),
                    **{**common, "hparams": json.dumps({**FAST, "oracle_ddpm_steps": 3})}))
    return {"root": root, "before": before, "cdga": read(run), "run": run, "oracle": read(oracle)}


def test_synthetic_images_are_in_the_training_batches(tmp_path, monkeypatch):
    """The trainer's batches contain the very images the generation cache holds (not only real ones)."""
    from domainfusion_bench.algorithms.cdga import CDGA
    from domainfusion_bench.diffusion.cache import GenerationCache

    seen = []
    original = CDGA.update

    def spy(self, minibatches):
        seen.append(torch.cat([x for x, _ in minibatches]).detach().clone())
        return original(self, minibatches)

    monkeypatch.setattr(CDGA, "update", spy)
    data = tmp_path / "data"
    train(TrainArgs(algorithm="CDGA", dataset="DigitStyles", test_envs=[0], steps=6, checkpoint_freq=5,
                    data_dir=str(data), hparams=json.dumps(FAST), num_workers=0, device="cpu", skip_model_save=True,
                    output_dir=str(tmp_path / "run")))
    cache = GenerationCache(data / ".dfbench_cache" / "generations")
    made = torch.stack([cache.load_image(e) for e in cache.manifest().values()])
    batches = torch.cat(seen)
    made_rows = {row.numpy().tobytes() for row in made.flatten(1)}
    hits = sum(row.numpy().tobytes() in made_rows for row in batches.flatten(1)) / len(batches)
    assert 0.3 < hits < 0.7  # cdga_synthetic_fraction 0.5 of every draw is a generated image
    strips = runfiles.read_previews(tmp_path / "run")  # one strip per training domain, with what it is
    assert len(strips) == 3 and {s["kind"] for s in strips} == {"img2img"} and all(s["sources_file"] for s in strips)
    assert all(s["valid"] is not None and len(s["valid"]) == s["n"] for s in strips)  # judged by the validity judge
    from domainfusion_bench.report import preview_gallery

    gallery = preview_gallery(tmp_path)  # the HTML leaderboard's "Generated images" section
    assert gallery.count('class="strip-head"') == 3 and "CDGA on DigitStyles" in gallery


def test_cdga_generates_trains_and_records_its_cost(cdga_runs):
    records = cdga_runs["cdga"]
    assert [r["step"] for r in records] == [0, 10, 20] and (cdga_runs["run"] / runfiles.DONE).exists()
    n_sources = 3 * SOURCES
    last = records[-1]
    assert last["args"]["algorithm"] == "CDGA" and last["hparams"]["cdga_k"] == 1
    assert last["cost_generated_images"] == 2 * n_sources  # each source toward the 2 other training domains
    assert last["cost_nfe"] == 2 * last["cost_generated_images"]  # int(10 DDIM steps x 0.2) per image, no CFG
    assert last["cost_generation_seconds"] > 0 and last["cost_diffusion_train_seconds"] > 0
    assert last["cost_reused_generated_images"] == 0 and "cost_reused_diffusion_train_seconds" not in last
    assert 0 <= last["env0_in_acc"] <= 1
    assert 0 <= last["metric_invalid_rate"] <= 1 and "metric_judge_val_acc" in last  # every generation is judged


def test_a_killed_cdga_run_resumes_without_regenerating_or_retraining(cdga_runs):
    before, after = cdga_runs["before"], cdga_runs["cdga"]
    assert [r["step"] for r in before] == [0, 10]
    cost_keys = [k for k in before[0] if k.startswith("cost_")]
    for key in cost_keys:  # the resumed records carry the cost of the generation it did before the kill
        assert after[-1][key] == before[-1][key], key
    assert after[:2] == before


def test_generation_never_touches_the_held_out_domain_except_the_oracle_condition(cdga_runs):
    lines = (cdga_runs["root"] / "data" / ".dfbench_cache" / "generations" / MANIFEST).read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    oracle_made = [e for e in entries if 0 in e["condition_domains"]]
    assert oracle_made and all(e["made_by"].endswith("oracle") for e in oracle_made)
    # toward the held-out domain CDGA* samples from noise (cdga_oracle_strength 1); every img2img starts from
    # a training domain
    assert all(e["source_domain"] is None and e["sampler"].get("strength") is None for e in oracle_made)
    assert all(e["source_domain"] in (1, 2, 3) for e in entries if e not in oracle_made)
    cdga_made = [e for e in entries if e["made_by"].endswith("cdga")]
    assert cdga_made and all(0 not in e["condition_domains"] and e["backbone_seen"] == [1, 2, 3] for e in cdga_made)
    # CDGA*'s generator is the oracle DDPM: it saw the held-out out-split (only: test_oracle_ddpm)
    assert all(e["backbone_seen"] == [0, 1, 2, 3] for e in entries if e["made_by"].endswith("oracle"))
    # the sources are the first images of the (shuffled) in-splits: never an out-split (validation) image
    dataset = get_dataset("DigitStyles", "unused")
    for env in (1, 2, 3):
        used = {e["source"]["index"] for e in entries if e["source_domain"] == env}
        assert used == set(split_indices(len(dataset.envs[env]), 0, env, 0.2)[1][:SOURCES])


def test_the_oracle_pays_for_its_own_generator_and_the_base_ddpm_once(cdga_runs):
    cdga, oracle = cdga_runs["cdga"][-1], cdga_runs["oracle"][-1]
    assert oracle["args"]["algorithm"] == "CDGA*"
    assert oracle["cost_reused_diffusion_train_seconds"] == oracle["cost_diffusion_train_seconds"] > 0
    assert oracle["cost_diffusion_train_seconds"] == cdga["cost_diffusion_train_seconds"]  # the base, charged once
    assert oracle["cost_oracle_diffusion_train_seconds"] > 0  # its own generator: fine-tuned by this run
    assert "cost_reused_oracle_diffusion_train_seconds" not in oracle
    assert oracle["cost_reused_generated_images"] == 0  # another generator: nothing of CDGA's is reused
    assert oracle["cost_generated_images"] == cdga["cost_generated_images"] * 3 / 2  # + toward the held-out domain
    # CDGA's 2 NFEs per img2img image, and per image toward the held-out domain a full 10-step trajectory
    # from noise at CFG 2 (two denoiser calls a step)
    assert oracle["cost_nfe"] == cdga["cost_nfe"] + 10 * 2 * cdga["cost_generated_images"] / 2


def test_cli_diffusion_train_trains_then_finds_the_model(tmp_path, capsys):
    from domainfusion_bench.cli import main

    argv = ["diffusion", "train", "--dataset", "DigitStyles", "--test_envs", "2", "--steps", "2", "--device", "cpu",
            "--data_dir", str(tmp_path)]
    main(argv + ["--preview", str(tmp_path / "preview.png")])
    assert "pixel DDPM trained" in capsys.readouterr().out and (tmp_path / "preview.png").stat().st_size > 0
    main(argv)
    out = capsys.readouterr().out
    assert "pixel DDPM found in cache" in out and "poster, crayon, chalk" in out
    with pytest.raises(SystemExit):
        main(["diffusion", "train", "--dataset", "DigitStyles", "--test_envs", "0", "1", "2", "3", "--data_dir", str(tmp_path)])
    assert "not valid for DigitStyles" in capsys.readouterr().err
