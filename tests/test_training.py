"""One training run: records, files, resume, accuracy, and clear errors."""

import json

import pytest
import torch

from domainfusion_bench import runfiles
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.training import train


def read(run_dir):
    records, skipped = runfiles.read_records(run_dir / runfiles.RESULTS)
    assert skipped == 0
    return records


def test_run_writes_domainbed_compatible_dir(tiny_train_args):
    run_dir = train(tiny_train_args())
    records = read(run_dir)
    assert [r["step"] for r in records] == [0, 10, 20]
    r = records[-1]
    for key in ("epoch", "loss", "step_time", "data_time", "images_per_s", "mem_gb", "wall_time", "hparams", "args"):
        assert key in r
    assert r["args"]["dataset"] == "RotatedDigits" and r["args"]["test_envs"] == [0]
    # default eval: what selection reads (train domains' out, test domain's in and out), nothing else
    accs = sorted(k for k in r if k.endswith("_acc"))
    assert accs == ["env0_in_acc", "env0_out_acc"] + [f"env{i}_out_acc" for i in range(1, 6)]
    assert list(json.loads((run_dir / runfiles.RESULTS).read_text().splitlines()[0])) == sorted(records[0])
    assert (run_dir / runfiles.DONE).exists() and not (run_dir / runfiles.RESUME).exists()
    assert not (run_dir / runfiles.LOCK).exists() and (run_dir / runfiles.MODEL).exists()
    assert "step    20" in (run_dir / "out.txt").read_text()
    splits = runfiles.read_splits(run_dir)
    env0 = splits["env0"]
    assert env0["domain"] == "0" and len(env0["out"]) == int(300 * 0.2) and len(env0["in"]) == 240


def test_eval_splits_all_and_done_run_is_skipped(tiny_train_args):
    run_dir = train(tiny_train_args(steps=2, eval_splits="all"))
    accs = [k for k in read(run_dir)[-1] if k.endswith("_acc")]
    assert len(accs) == 12
    before = (run_dir / runfiles.RESULTS).read_text()
    train(tiny_train_args(steps=2, eval_splits="all"))
    assert (run_dir / runfiles.RESULTS).read_text() == before


def test_erm_learns_the_held_out_domain(tiny_train_args):
    """A short ERM run on RotatedDigits is well above chance (10%) on the held-out 0-degree domain."""
    run_dir = train(tiny_train_args(steps=151, checkpoint_freq=150, hparams='{"batch_size": 32, "lr": 0.003}'))
    assert read(run_dir)[-1]["env0_in_acc"] > 0.4


class Crash(Exception):
    pass


def test_resume_after_a_crash_equals_an_uninterrupted_run(tiny_train_args, tmp_path, monkeypatch):
    full = train(tiny_train_args(output_dir=str(tmp_path / "full"), steps=31))

    beats = []
    real_heartbeat = runfiles.heartbeat

    def crash_on_second_checkpoint(run_dir):
        real_heartbeat(run_dir)
        beats.append(1)
        if len(beats) == 2:  # after the step-10 record and resume point
            raise Crash("simulated kill")

    monkeypatch.setattr(runfiles, "heartbeat", crash_on_second_checkpoint)
    args = tiny_train_args(output_dir=str(tmp_path / "resumed"), steps=31)
    with pytest.raises(Crash):
        train(args)
    run_dir = tmp_path / "resumed"
    assert (run_dir / runfiles.FAILED).exists() and not (run_dir / runfiles.DONE).exists()
    assert json.loads((run_dir / runfiles.FAILED).read_text())["error"] == "Crash: simulated kill"
    # a record written after the resume point, then a half-written line: both must go
    with open(run_dir / runfiles.RESULTS, "a") as f:
        f.write(json.dumps({"step": 20, "stale": True}) + "\n" + '{"step": 3')
    monkeypatch.setattr(runfiles, "heartbeat", real_heartbeat)
    train(args)

    resumed, uninterrupted = read(run_dir), read(full)
    assert [r["step"] for r in resumed] == [0, 10, 20, 30]
    assert not (run_dir / runfiles.FAILED).exists()
    for a, b in zip(resumed, uninterrupted):
        assert a["loss"] == b["loss"]
        assert {k: v for k, v in a.items() if k.endswith("_acc")} == {k: v for k, v in b.items() if k.endswith("_acc")}
    final_a = torch.load(run_dir / runfiles.MODEL, weights_only=False)["model_dict"]
    final_b = torch.load(full / runfiles.MODEL, weights_only=False)["model_dict"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_b)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(algorithm="ERMM"), "unknown algorithm 'ERMM'. Did you mean 'ERM'?"),
        (dict(dataset="PAC"), "unknown dataset 'PAC'"),
        (dict(test_envs=[6]), "--test_envs [6] is not valid for RotatedDigits"),
        (dict(test_envs=[0, 1, 2, 3, 4, 5]), "leaving at least one training domain"),
        (dict(hparams="{lr: 1}"), "--hparams is not valid JSON"),
        (dict(hparams='{"lrr": 0.1}'), "unknown hyperparameter(s) lrr for ERM on RotatedDigits"),
        (dict(hparams='{"lr": "1e-4"}'), "hyperparameter lr for ERM on RotatedDigits must be a number"),
        (dict(dataset="PACS", data_dir="/nonexistent"), "dfbench download PACS"),
    ],
)
def test_bad_input_gives_one_clear_error(tiny_train_args, overrides, message):
    with pytest.raises(DfbenchError) as err:
        train(tiny_train_args(**overrides))
    assert message in str(err.value)


def test_a_run_held_by_a_live_process_is_not_trained_twice(tiny_train_args, tmp_path, monkeypatch):
    import socket
    import subprocess
    import time

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    other = subprocess.Popen(["sleep", "60"])
    try:
        lock = {"pid": other.pid, "host": socket.gethostname(), "started": time.time()}
        (run_dir / runfiles.LOCK).write_text(json.dumps(lock))
        with pytest.raises(DfbenchError, match=f"being trained right now by process {other.pid}"):
            train(tiny_train_args(steps=2))
        assert not (run_dir / runfiles.RESULTS).exists() and not (run_dir / runfiles.FAILED).exists()
        # a launcher's claim is taken over only by the trainer it started (which holds its token)
        (run_dir / runfiles.LOCK).write_text(json.dumps({**lock, "launcher": True, "token": "t0k"}))
        with pytest.raises(DfbenchError, match="being trained right now"):
            train(tiny_train_args(steps=2))
        monkeypatch.setenv(runfiles.CLAIM_ENV, "t0k")
        train(tiny_train_args(steps=2))
        assert (run_dir / runfiles.DONE).exists()
    finally:
        other.kill()
        other.wait()


def test_a_lock_left_by_a_dead_process_does_not_block_resuming(tiny_train_args, tmp_path):
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / runfiles.LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    train(tiny_train_args(steps=2))
    assert (run_dir / runfiles.DONE).exists()


def test_records_without_a_resume_point_are_redone_not_duplicated(tiny_train_args, tmp_path):
    """Killed after the step-0 record but before its resume point: the rerun starts at 0 and writes it once."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / runfiles.RESULTS).write_text(json.dumps({"step": 0, "stale": True}) + "\n" + '{"step": 5, "env')
    train(tiny_train_args(steps=11, checkpoint_freq=5))
    assert [r["step"] for r in read(run_dir)] == [0, 5, 10]
    assert "stale" not in read(run_dir)[0]


def test_speed_defaults_are_decided_per_device():
    from domainfusion_bench.training import Speed

    assert (Speed().on(cuda=True).channels_last, Speed().on(cuda=True).pin_memory) == (True, True)
    assert (Speed().on(cuda=False).channels_last, Speed().on(cuda=False).pin_memory) == (False, False)
    assert Speed(channels_last=False).on(cuda=True).channels_last is False  # an explicit choice wins
    assert Speed.domainbed().on(cuda=True).pin_memory is False
