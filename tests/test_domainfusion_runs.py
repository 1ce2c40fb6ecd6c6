"""DomainFusion runs on DigitStyles: loss_ld, pool, refreshes and their schedule, costs against CDGA, resume
after a refresh, the leakage guard on the pool, and the ablation rows."""

import json

import numpy as np
import pytest
import torch

from domainfusion_bench.errors import DfbenchError
from tests.test_domainfusion import algorithm_defaults

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
