"""Run integrity: a run dir holds one configuration, one trainer at a time, a live heartbeat, and a
resume point that is atomic, safe to load and recovered from when corrupt; the run hash covers what
changes results and nothing else."""

import dataclasses
import json
import multiprocessing
import os
import socket
import time
from pathlib import Path

import pytest
import torch

from domainfusion_bench import runfiles, training
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.protocol import run_hash
from domainfusion_bench.training import TrainArgs, train


def read(run_dir):
    records, skipped = runfiles.read_records(run_dir / runfiles.RESULTS)
    assert skipped == 0
    return records


# ------------------------------------------------------------------------------------ fingerprint


@pytest.mark.parametrize("change,named", [
    (dict(test_envs=[1]), "test_envs"),
    (dict(hparams='{"batch_size": 8}'), "hparams"),
    (dict(trial_seed=1), "trial_seed"),
    (dict(steps=3), "steps"),
])
def test_a_done_run_dir_refuses_another_configuration(tiny_train_args, change, named):
    run_dir = train(tiny_train_args(steps=2))
    before = (run_dir / runfiles.RESULTS).read_text()
    with pytest.raises(DfbenchError, match=f"holds another configuration.*{named}"):
        train(tiny_train_args(**{"steps": 2, **change}))
    assert (run_dir / runfiles.RESULTS).read_text() == before
    assert json.loads((run_dir / runfiles.FINGERPRINT).read_text())["test_envs"] == [0]
    train(tiny_train_args(steps=2, num_workers=1, eval_batch_size=7))  # same configuration: done, fine


def test_an_interrupted_run_of_another_configuration_is_never_resumed(tiny_train_args, tmp_path, monkeypatch):
    class Crash(Exception):
        pass

    def crash(run_dir):
        raise Crash()

    monkeypatch.setattr(runfiles, "heartbeat", crash)  # killed right after the step-0 resume point
    with pytest.raises(Crash):
        train(tiny_train_args(steps=21, test_envs=[0]))
    monkeypatch.undo()
    run_dir = tmp_path / "run"
    assert (run_dir / runfiles.RESUME).exists()
    with pytest.raises(DfbenchError, match=r"test_envs: \[0\] there, \[2\] now"):
        train(tiny_train_args(steps=21, test_envs=[2]))
    assert (run_dir / runfiles.RESUME).exists() and not (run_dir / runfiles.DONE).exists()


def test_a_run_dir_of_an_older_dfbench_is_checked_against_its_records(tiny_train_args, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = dataclasses.asdict(tiny_train_args(dataset="ColoredDigits"))
    (run_dir / runfiles.RESULTS).write_text(json.dumps({"step": 0, "args": args, "hparams": {}}) + "\n")
    with pytest.raises(DfbenchError, match="dataset: 'ColoredDigits' there, 'RotatedDigits' now"):
        train(tiny_train_args(steps=2))


def test_default_output_dir_is_unique_per_configuration(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert TrainArgs().output_dir is None
    base = dict(dataset="RotatedDigits", test_envs=[0], steps=1, hparams='{"batch_size": 8}', num_workers=0,
                device="cpu", skip_model_save=True)
    a = train(TrainArgs(**base))
    b = train(TrainArgs(**{**base, "test_envs": [1]}))
    assert a != b and a.parent == b.parent == Path("results") / "train"
    assert a.name == run_hash(dataclasses.asdict(TrainArgs(**base)))
    assert read(a)[0]["args"]["output_dir"] == str(a)
    # the splits of runs beside each other are stored once per (dataset, trial, holdout)
    from domainfusion_bench.protocol import split_indices

    assert len(list((a.parent / runfiles.SHARED_SPLITS).iterdir())) == 1
    assert (a / runfiles.SPLITS).stat().st_size < 2000
    out, into = split_indices(300, 0, 0, 0.2)
    assert runfiles.read_splits(a)["env0"]["out"] == runfiles.read_splits(b)["env0"]["out"] == out
    assert json.loads((a / runfiles.SPLITS).read_text())["env0"] == {"domain": "0", "n_in": 240, "n_out": 60}


# ------------------------------------------------------------------------------ claims, liveness


def _race(run_dir, barrier, out):
    barrier.wait()
    claimed, _ = runfiles.claim(run_dir)
    out.put(claimed)
    time.sleep(1.0)  # stay alive while the others try


def test_claiming_a_run_is_exclusive_across_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(tmp_path / "run", barrier, out)) for _ in range(6)]
    for p in procs:
        p.start()
    wins = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join()
    assert sum(wins) == 1
    assert not (tmp_path / "run" / runfiles.CLAIM_MUTEX).exists()


def test_a_stale_claim_mutex_is_broken(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    mutex = run_dir / runfiles.CLAIM_MUTEX
    mutex.touch()
    old = time.time() - runfiles.CLAIM_MUTEX_STALE_S - 5
    os.utime(mutex, (old, old))
    assert runfiles.claim(run_dir)[0]


def test_the_loser_of_a_claim_never_writes_failed_into_the_winners_run(tiny_train_args, tmp_path, monkeypatch):
    """Another process takes the run over (e.g. a requeued job on another node) while this one still runs:
    this one's crash must not mark the other's run failed, nor remove its lock."""
    import subprocess

    other = subprocess.Popen(["sleep", "60"])
    run_dir = tmp_path / "run"

    def taken_over(*args, **kwargs):
        lock = {"pid": other.pid, "host": socket.gethostname(), "started": time.time()}
        (run_dir / runfiles.LOCK).write_text(json.dumps(lock))
        raise RuntimeError("this process lost the run")

    monkeypatch.setattr(training.run, "_train", taken_over)
    try:
        with pytest.raises(RuntimeError):
            train(tiny_train_args(steps=2))
        assert not (run_dir / runfiles.FAILED).exists()
        assert json.loads((run_dir / runfiles.LOCK).read_text())["pid"] == other.pid
    finally:
        other.kill()
        other.wait()


def test_heartbeat_is_refreshed_during_a_long_stage(tiny_train_args, tmp_path, monkeypatch):
    """A stage without checkpoints (generation, helper training) still reads as alive from another host,
    so delete-incomplete leaves the run alone."""
    from domainfusion_bench.sweep import State, run_state

    monkeypatch.setattr(runfiles.locks, "HEARTBEAT_INTERVAL_S", 0.05)
    seen = {}
    run_dir = tmp_path / "run"

    def seen_from_another_host():
        with monkeypatch.context() as m:  # liveness as another node judges it: by the lock's mtime alone
            m.setattr(runfiles.locks.socket, "gethostname", lambda: "another-node")
            return run_state(run_dir).state

    def long_stage(args, hparams, runtime, run_dir_):
        lock = run_dir / runfiles.LOCK
        stale = time.time() - runfiles.HEARTBEAT_TIMEOUT_S - 60
        os.utime(lock, (stale, stale))
        seen["before"] = seen_from_another_host()
        time.sleep(0.5)  # a long stage: no checkpoint, no explicit heartbeat
        seen["during"] = seen_from_another_host()

    monkeypatch.setattr(training.run, "_train", long_stage)
    train(tiny_train_args(steps=2))
    assert seen == {"before": State.FAILED, "during": State.RUNNING}


def test_a_pending_slurm_submission_is_not_submitted_again(tmp_path, monkeypatch):
    import submitit

    from domainfusion_bench.launchers import SlurmLauncher, launch_sweep
    from domainfusion_bench.sweep import State, make_jobs, parse_spec, run_state

    spec = parse_spec(dict(name="p", datasets=["RotatedDigits"], algorithms=["ERM"], n_hparams=1, n_trials=1,
                           test_envs=[[0], [1]], steps=2, output_dir=str(tmp_path / "out")))
    jobs = make_jobs(spec)
    submitted_runs = []

    class FakeJob:
        def __init__(self, i):
            self.job_id = f"77_{i}"

    class FakeExecutor:
        def __init__(self, **kwargs):
            pass

        def update_parameters(self, **kwargs):
            pass

        def submit_array(self, runs):
            # marked pending before the array is submitted, so no relaunch can race the submission
            assert all(runfiles.pending_submission(r.run_dir) for r in runs)
            submitted_runs.extend(r.run_dir for r in runs)
            return [FakeJob(i) for i in range(len(runs))]

    monkeypatch.setattr(submitit, "AutoExecutor", FakeExecutor)
    monkeypatch.setattr(submitit.helpers, "as_completed", lambda jobs, poll_frequency: [])
    monkeypatch.setattr(SlurmLauncher, "OPTIONS", {**SlurmLauncher.OPTIONS, "cluster": "local"})
    launch_sweep(spec, "slurm")
    assert sorted(submitted_runs) == sorted(str(j.run_dir) for j in jobs)
    assert run_state(jobs[0].run_dir).state == State.RUNNING
    assert "Slurm job 77_" in run_state(jobs[0].run_dir).reason
    launch_sweep(spec, "slurm")  # again, while pending: nothing new
    assert len(submitted_runs) == len(jobs)
    stale = time.time() - runfiles.SUBMITTED_TIMEOUT_S - 60
    os.utime(jobs[1].run_dir / runfiles.SUBMITTED, (stale, stale))  # cancelled long ago
    launch_sweep(spec, "slurm")
    assert submitted_runs[len(jobs):] == [str(jobs[1].run_dir)]


# ----------------------------------------------------------------------------------- resume.pt


def test_resume_point_is_plain_data_written_durably(tmp_path, monkeypatch):
    import random

    import numpy as np

    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    state = {"step": 7, "rng": training.resume._rng_state()}
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(runfiles.resume.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    path = tmp_path / runfiles.RESUME
    runfiles.save_resume(path, state)
    assert len(synced) >= 2  # the file and its directory
    assert not [p for p in tmp_path.iterdir() if p.name != runfiles.RESUME]  # no temp file left
    loaded = torch.load(path, weights_only=True)  # no arbitrary unpickling needed
    expected = (random.random(), np.random.rand(), torch.rand(1))
    training.resume._set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_a_resume_point_that_could_not_be_loaded_safely_is_refused_at_save_time(tmp_path):
    import numpy as np

    with pytest.raises(TypeError, match=r"state\['algorithm'\]\['pool'\] is a numpy.ndarray"):
        runfiles.save_resume(tmp_path / runfiles.RESUME, {"step": 1, "algorithm": {"pool": np.zeros(3)}})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("damage", [b"", b"not a zip file at all", "truncate"])
def test_a_corrupt_resume_point_restarts_cleanly(tiny_train_args, tmp_path, monkeypatch, capfd, damage):
    class Crash(Exception):
        pass

    beats = []

    def crash_on_second_checkpoint(run_dir):
        beats.append(1)
        if len(beats) == 2:
            raise Crash()

    monkeypatch.setattr(runfiles, "heartbeat", crash_on_second_checkpoint)
    with pytest.raises(Crash):
        train(tiny_train_args(steps=21))
    monkeypatch.undo()
    run_dir = tmp_path / "run"
    resume = run_dir / runfiles.RESUME
    resume.write_bytes(resume.read_bytes()[:200] if damage == "truncate" else damage)
    capfd.readouterr()
    train(tiny_train_args(steps=21))
    err = capfd.readouterr().err
    assert f"resume point {resume} is corrupt" in err and "restarting from step 0" in err
    assert [r["step"] for r in read(run_dir)] == [0, 10, 20]
    assert (run_dir / runfiles.DONE).exists() and (run_dir / (runfiles.RESUME + ".corrupt")).exists()


# ------------------------------------------------------------------------------------- run hash


def test_run_hash_covers_what_changes_results_and_nothing_else(tmp_path):
    base = dataclasses.asdict(TrainArgs(output_dir="x"))
    h = run_hash(base)
    assert run_hash({**base, "num_workers": 3}) == h
    assert run_hash({**base, "eval_batch_size": 999}) == h
    assert run_hash({**base, "eval_splits": "all"}) != h
    assert run_hash({**base, "precision": "fp32"}) != h
    a, b, c = tmp_path / "a.py", tmp_path / "sub" / "a.py", tmp_path / "c.py"
    b.parent.mkdir()
    a.write_text("X = 1\n")
    b.write_text("X = 1\n")
    c.write_text("X = 2\n")
    assert run_hash({**base, "plugins": [str(a)]}) == run_hash({**base, "plugins": [str(b)]})  # moved: same
    assert run_hash({**base, "plugins": [str(a)]}) != run_hash({**base, "plugins": [str(c)]})  # edited: new
    assert run_hash({**base, "plugins": [str(a)]}) != h


# ---------------------------------------------------------------------- grid points, divergence


def _records(algorithm="ERM", overrides=None, diverged=False, trial=0):
    recs = []
    for t in range(3):
        for step, acc in ((0, 0.5), (10, 0.7)):
            rec = {"args": {"dataset": "D", "algorithm": algorithm, "test_envs": [t], "hparams_seed": 0,
                            "trial_seed": trial, "hparams": overrides}, "step": step}
            for i in range(3):
                rec[f"env{i}_out_acc"] = acc + 0.01 * i
                rec[f"env{i}_in_acc"] = acc + (0.2 if overrides and "0.1" in overrides else 0.0)
            if diverged and step == 10:
                rec["diverged_at"] = 5
            recs.append(rec)
    return recs


def test_grid_points_are_rows_of_their_own_under_every_selection():
    from domainfusion_bench.collect import records_to_frame
    from domainfusion_bench.tables import build_leaderboard

    recs = _records(overrides='{"lr": 0.01, "batch_size": 8}') + _records(overrides='{"lr": 0.1, "batch_size": 8}')
    frame, bad = records_to_frame(recs)
    assert bad == 0
    assert sorted(frame["algorithm"].unique()) == ["ERM [lr=0.01]", "ERM [lr=0.1]"]
    board = build_leaderboard(frame, {"D": ["a", "b", "c"]}, selections=["iid", "oracle"])
    for table in board.tables:
        if table.kind == "dataset":
            assert table.rows == ["ERM [lr=0.01]", "ERM [lr=0.1]"]
            assert table.cells[("ERM [lr=0.1]", "a")].mean == pytest.approx(90.0)
            assert table.cells[("ERM [lr=0.01]", "a")].mean == pytest.approx(70.0)
    alone, _ = records_to_frame(_records(overrides='{"batch_size": 8}'))
    assert list(alone["algorithm"].unique()) == ["ERM"]  # one override set: the plain name


def test_a_diverged_run_stays_in_selection_and_is_marked(tiny_train_args, tmp_path):
    from domainfusion_bench.collect import records_to_frame
    from domainfusion_bench.tables import build_leaderboard, render

    run_dir = train(tiny_train_args(steps=11, checkpoint_freq=5, hparams='{"batch_size": 16, "lr": 1e30}'))
    records = read(run_dir)
    assert (run_dir / runfiles.DONE).exists() and not (run_dir / runfiles.FAILED).exists()
    assert [r["step"] for r in records] == [0, 5, 10]
    assert records[-1]["diverged_at"] <= 10 and records[-1]["args"]["hparams"]

    frame, _ = records_to_frame(_records(trial=0, diverged=True) + _records(trial=1), run=["r0"] * 6 + ["r1"] * 6)
    board = build_leaderboard(frame, {"D": ["a", "b", "c"]}, selections=["iid"])
    table = board.tables[0]
    assert table.cells[("ERM", "a")].n == 2  # the diverged trial still counts
    assert any("ERM: 1 of 2 runs diverged" in note for note in table.notes)
    assert "diverged" in render(board, "text")


def test_collect_metrics_table_at_the_selected_checkpoint(tmp_path, capsys):
    from results_factory import record, write_run

    from domainfusion_bench.cli import main

    for t in range(3):
        for trial in (0, 1):
            recs = []
            for step in (0, 10):
                rec = record("D", "M", [t], 0, trial, step, **{f"env{i}_out_acc": 0.5 for i in range(3)},
                             **{f"env{t}_in_acc": 0.6})
                rec.update(metric_zeta=float(step + trial), metric_alpha=2.0, cost_nfe=1.0)
                recs.append(rec)
            write_run(tmp_path, f"r{t}{trial}", recs)
    main(["collect", str(tmp_path), "--metrics", "--selection", "oracle"])
    out = capsys.readouterr().out
    block = out[out.index("metrics at the checkpoint oracle selects"):].splitlines()
    header, row = block[1].split(), block[2].split()
    assert header == ["Algorithm", "alpha", "zeta"]  # sorted by name, one column per metric
    assert row == ["M", "2", "10.5"]  # oracle: last step; mean over 3 test domains x 2 trials of step + trial
    main(["collect", str(tmp_path), "--selection", "oracle"])
    assert "metrics at" not in capsys.readouterr().out


# --------------------------------------------------------------------- differences, recorded


def test_eval_augment_flag_and_protocol_settings_are_recorded(tiny_train_args):
    from domainfusion_bench.cli import build_parser

    assert build_parser().parse_args(["train", "--eval_augment"]).eval_augment is True
    base = dataclasses.asdict(TrainArgs(output_dir="x"))
    assert run_hash({**base, "eval_augment": True}) != run_hash(base)
    run_dir = train(tiny_train_args(steps=1, eval_augment=True))
    args = read(run_dir)[-1]["args"]
    assert args["eval_augment"] is True
    assert args["protocol"] == {"precision": "fp32", "cudnn_benchmark": False, "eval_augment": True,
                                "eval_splits": "needed", "image_store": None, "dataset": []}


def test_colored_mnist_at_14_and_28_pixels():
    from domainfusion_bench.data.mnist import ColoredMNIST, ColoredMNIST28

    images = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (50,))
    small = ColoredMNIST.make_environment(ColoredMNIST.__new__(ColoredMNIST), images, labels, 1)
    full = ColoredMNIST28.make_environment(ColoredMNIST28.__new__(ColoredMNIST28), images, labels, 1)
    assert small.tensors[0].shape[1:] == ColoredMNIST.input_shape == (2, 14, 14)
    assert full.tensors[0].shape[1:] == ColoredMNIST28.input_shape == (2, 28, 28)
    assert torch.equal(small.tensors[1], full.tensors[1])  # same labels and colours, only the resolution differs
    assert torch.equal(full.tensors[0][:, :, ::2, ::2], small.tensors[0])
    assert any("14 px" in d for d in ColoredMNIST.DIFFERENCES) and any("28 px" in d for d in ColoredMNIST28.DIFFERENCES)
