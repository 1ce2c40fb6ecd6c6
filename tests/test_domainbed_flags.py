"""DomainBed's remaining train.py flags (--task domain_adaptation, --uda_holdout_fraction,
--save_model_every_checkpoint) and --log_with's experiment trackers, on seconds-long RotatedDigits runs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from domainfusion_bench import runfiles
from domainfusion_bench.algorithms import ALGORITHMS, register_algorithm
from domainfusion_bench.algorithms.erm import ERM
from domainfusion_bench.data import get_dataset
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.protocol import run_hash, split_indices
from domainfusion_bench.training import TrainArgs, make_splits, train

SEEN: list = []


@pytest.fixture(scope="module", autouse=True)
def recording_algorithm():
    class RecordsUnlabeled(ERM):
        def update(self, minibatches, unlabeled=None):
            SEEN.append(None if unlabeled is None else [x.clone() for x in unlabeled])
            return super().update(minibatches)

    class NoUnlabeled(ERM):
        def update(self, minibatches):
            return super().update(minibatches)

    register_algorithm("_RecordsUnlabeled")(RecordsUnlabeled)
    register_algorithm("_NoUnlabeled")(NoUnlabeled)
    yield
    for name in ("_RecordsUnlabeled", "_NoUnlabeled"):
        ALGORITHMS._entries.pop(name, None)


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / runfiles.RESULTS).read_text().splitlines()]


def test_uda_split_is_domainbeds_and_disjoint_from_the_held_out_in_split():
    ds = get_dataset("RotatedDigits", "datasets")
    args = TrainArgs(dataset="RotatedDigits", test_envs=[1], trial_seed=3, uda_holdout_fraction=0.25)
    _, splits, record = make_splits(ds, args, {"data_augmentation": False})
    plain = make_splits(ds, dataclasses.replace(args, uda_holdout_fraction=0.0), {"data_augmentation": False})[2]
    uda, held_in, held_out = (set(record["env1"][k]) for k in ("uda", "in", "out"))
    full_in = plain["env1"]["in"]
    assert not uda & held_in and not uda & held_out and uda | held_in == set(full_in)
    # DomainBed: split_dataset(in_, int(len(in_) * uda_holdout_fraction), seed_hash(trial_seed, env))
    positions = split_indices(len(full_in), 3, 1, 0.25)[0]
    assert record["env1"]["uda"] == [full_in[k] for k in positions] and len(uda) == int(len(full_in) * 0.25)
    assert list(splits["env1_uda"].indices) == record["env1"]["uda"] and len(splits["env1_in"]) == len(held_in)
    assert "uda" not in record["env0"] and "env0_uda" not in splits  # training domains keep their in-splits
    assert record["env0"] == plain["env0"]


def test_domain_adaptation_gives_update_the_uda_images(tiny_train_args):
    SEEN.clear()
    args = tiny_train_args(algorithm="_RecordsUnlabeled", steps=3, checkpoint_freq=1, task="domain_adaptation",
                           uda_holdout_fraction=0.2)
    run = train(args)
    assert len(SEEN) == 3 and all(u is not None and len(u) == 1 and len(u[0]) == 16 for u in SEEN)
    ds = get_dataset("RotatedDigits", "datasets")
    _, splits, _ = make_splits(ds, args, {"data_augmentation": False})
    x, _, rows = splits["env0_uda"].tensor_view()
    uda_images = x[rows].flatten(1)
    held_in = splits["env0_in"].tensor_view()
    in_images = held_in[0][held_in[2]].flatten(1)
    for batch in SEEN:
        seen = batch[0].flatten(1)
        assert (seen[:, None] == uda_images[None]).all(-1).any(1).all()  # each one is a UDA-split image
        assert not (seen[:, None] == in_images[None]).all(-1).any()  # and none is scored as held-out in-split
    record = _records(run)[-1]
    assert record["args"]["task"] == "domain_adaptation" and record["args"]["uda_holdout_fraction"] == 0.2
    assert record["args"]["track"] == "UDA, 0.2 of the held-out in-split unlabelled"


def test_domain_generalization_keeps_the_uda_split_out_of_update(tiny_train_args):
    SEEN.clear()
    run = train(tiny_train_args(algorithm="_RecordsUnlabeled", steps=2, uda_holdout_fraction=0.2))
    assert SEEN == [None, None]
    assert _records(run)[-1]["args"]["track"] == "0.2 of the held-out in-split held back for UDA"


def test_bad_uda_inputs_are_one_clear_error(tiny_train_args):
    with pytest.raises(DfbenchError, match="needs unlabelled held-out data: add --uda_holdout_fraction"):
        train(tiny_train_args(task="domain_adaptation"))
    with pytest.raises(DfbenchError, match="uda_holdout_fraction must be a number in"):
        train(tiny_train_args(uda_holdout_fraction=1.0))
    with pytest.raises(DfbenchError, match="task must be domain_generalization | domain_adaptation"):
        train(tiny_train_args(task="uda"))
    with pytest.raises(DfbenchError, match="_NoUnlabeled.update takes no `unlabeled` argument|NoUnlabeled.update"):
        train(tiny_train_args(algorithm="_NoUnlabeled", task="domain_adaptation", uda_holdout_fraction=0.2))


def test_save_model_every_checkpoint_writes_one_file_per_checkpoint(tiny_train_args):
    run = train(tiny_train_args(steps=5, checkpoint_freq=2, save_model_every_checkpoint=True, skip_model_save=True))
    assert sorted(p.name for p in run.glob("model_step*.pkl")) == ["model_step0.pkl", "model_step2.pkl",
                                                                    "model_step4.pkl"]
    saved = torch.load(run / "model_step2.pkl", weights_only=False)
    last = torch.load(run / "model_step4.pkl", weights_only=False)
    assert saved["model_hparams"]["batch_size"] == 16 and set(saved["model_dict"]) == set(last["model_dict"])
    assert any(not torch.equal(saved["model_dict"][k], last["model_dict"][k]) for k in saved["model_dict"])
    assert not (run / runfiles.MODEL).exists()


def test_new_flags_leave_run_hashes_as_they_were():
    base = dataclasses.asdict(TrainArgs())
    older = {k: v for k, v in base.items() if k not in ("task", "uda_holdout_fraction", "save_model_every_checkpoint",
                                                         "log_with")}
    assert run_hash(base) == run_hash(older)  # runs named before these flags keep their names
    assert run_hash({**base, "log_with": "tensorboard", "save_model_every_checkpoint": True}) == run_hash(base)
    assert run_hash({**base, "uda_holdout_fraction": 0.2}) != run_hash(base)
    assert run_hash({**base, "task": "domain_adaptation", "uda_holdout_fraction": 0.2}) != \
        run_hash({**base, "uda_holdout_fraction": 0.2})


def test_tensorboard_events_hold_the_records_numbers(tiny_train_args):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(tiny_train_args(steps=3, checkpoint_freq=1, log_with="tensorboard"))
    events = list(run.rglob("events.out.tfevents.*"))
    assert events and all(run in p.parents for p in events)
    acc = EventAccumulator(str(events[0].parent)).Reload()
    records = _records(run)
    for key in ("env0_in_acc", "env0_out_acc", "env1_out_acc", "loss"):
        logged = {e.step: e.value for e in acc.Scalars(key)}
        assert logged == pytest.approx({r["step"]: r[key] for r in records}, abs=1e-6), key


def test_trackers_missing_or_unknown_are_one_clear_error(tiny_train_args, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(DfbenchError, match=r"--log_with wandb needs the wandb package: pip install wandb"):
        train(tiny_train_args(log_with="wandb"))
    with pytest.raises(DfbenchError, match="log_with must be one or more of tensorboard, wandb, mlflow, aim"):
        train(tiny_train_args(log_with="neptune"))


def test_non_main_processes_log_nothing(tmp_path):
    from accelerate import Accelerator

    from domainfusion_bench.training.logs import Trackers

    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    trackers = Trackers(accelerator, tmp_path, TrainArgs(), {"lr": 1e-3}, is_main=False)
    trackers.log({"step": 0, "env0_in_acc": 0.5})
    trackers.end()
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
    main = Trackers(accelerator, tmp_path, TrainArgs(), {"lr": 1e-3, "stages": ["a"]}, is_main=True)
    main.log({"step": 0, "env0_in_acc": 0.5})
    main.end()
    assert list(tmp_path.rglob("events.out.tfevents.*"))


def test_a_sweep_spec_passes_log_with_and_the_new_flags_to_its_runs(tmp_path):
    from domainfusion_bench.sweep import make_jobs, parse_spec

    base = dict(name="t", datasets=["RotatedDigits"], algorithms=["ERM"], n_hparams=1, n_trials=1, test_envs=[[0]],
                steps=3, output_dir=str(tmp_path / "out"), data_dir=str(tmp_path / "data"))
    plain = make_jobs(parse_spec(base))[0]
    logged = make_jobs(parse_spec({**base, "train_args": {"log_with": "tensorboard", "save_model_every_checkpoint": True,
                                                          "task": "domain_adaptation", "uda_holdout_fraction": 0.2}}))[0]
    assert logged.args.log_with == "tensorboard" and logged.args.task == "domain_adaptation"
    assert logged.args.save_model_every_checkpoint and logged.args.uda_holdout_fraction == 0.2
    from domainfusion_bench.cli import build_parser
    from domainfusion_bench.sweep import train_argv

    ns = build_parser().parse_args(train_argv(logged.args))  # what a launched child gets
    assert TrainArgs(**{k: v for k, v in vars(ns).items() if k in TrainArgs.__dataclass_fields__}) == logged.args
    assert make_jobs(parse_spec({**base, "train_args": {"log_with": "tensorboard"}}))[0].run_dir == plain.run_dir
    with pytest.raises(DfbenchError, match="log_with must be one or more of"):
        parse_spec({**base, "train_args": {"log_with": "tensorbord"}})
