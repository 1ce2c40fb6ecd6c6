"""A trainer that lost its claim (another process took the run over: a stale-looking heartbeat, clock skew,
a forced requeue) writes nothing more into the run and ends with one clear error (issue #21)."""

import json
import socket
import time

import pytest

from domainfusion_bench import runfiles, training
from domainfusion_bench.training import train


def take_over(run_dir, host="node-b"):
    """What another process's claim leaves in the lock."""
    lock = {"pid": 4242, "host": host, "started": time.time(), "claim_id": "theirs"}
    (run_dir / runfiles.LOCK).write_text(json.dumps(lock))


def test_every_write_of_a_run_checks_the_claim(tmp_path):
    run = tmp_path / "run"
    assert runfiles.claim(run)[0]
    runfiles.append_record(run, {"step": 0})
    runfiles.save_resume(run / runfiles.RESUME, {"step": 0})
    before = (run / runfiles.RESUME).read_bytes()
    take_over(run)
    writes = {
        "record": lambda: runfiles.append_record(run, {"step": 1}),
        "resume": lambda: runfiles.save_resume(run / runfiles.RESUME, {"step": 1}),
        "done": lambda: runfiles.write_done(run),
        "truncate": lambda: runfiles.keep_records_through(run, -1),
        "splits": lambda: runfiles.write_splits(run, {"env0": {"domain": "a", "in": [1], "out": [0]}}, "k"),
        "heartbeat": lambda: runfiles.heartbeat(run),
    }
    for name, write in writes.items():
        with pytest.raises(runfiles.LostClaim, match=r"taken over .* process 4242 on node-b.* writes nothing more"):
            write()
    assert runfiles.read_records(run / runfiles.RESULTS)[0] == [{"step": 0}]
    assert (run / runfiles.RESUME).read_bytes() == before and not list(run.glob(".resume.pt.tmp*"))
    assert not (run / runfiles.DONE).exists() and not (run / runfiles.SPLITS).exists()
    assert not runfiles.holds_lock(run)
    with training.logs._logs_to(run, True):
        print("a line after the takeover")
    assert "after the takeover" not in (run / "out.txt").read_text()  # the run's log is the new owner's now
    runfiles.release_lock(run)  # not ours: left alone
    assert json.loads((run / runfiles.LOCK).read_text())["claim_id"] == "theirs"


def test_a_new_claim_of_the_same_process_is_another_claim(tmp_path):
    """A forced requeue on the same host can even reuse the pid: the claim id still tells them apart."""
    run = tmp_path / "run"
    assert runfiles.claim(run)[0]
    lock = json.loads((run / runfiles.LOCK).read_text())
    (run / runfiles.LOCK).write_text(json.dumps({**lock, "claim_id": "a later claim"}))
    assert lock["host"] == socket.gethostname() and not runfiles.holds_lock(run)
    with pytest.raises(runfiles.LostClaim):
        runfiles.append_record(run, {"step": 0})
    runfiles.release_lock(run)


def test_a_trainer_taken_over_mid_run_stops_and_writes_nothing_more(tiny_train_args, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    step = training.loop._step

    def step_then_lose_the_run(run, i, *args):
        step(run, i, *args)
        if i == 5:  # after the first record and resume point
            take_over(run_dir)

    monkeypatch.setattr(training.loop, "_step", step_then_lose_the_run)
    with pytest.raises(runfiles.LostClaim, match="writes nothing more"):
        train(tiny_train_args(steps=21, checkpoint_freq=10))
    assert [r["step"] for r in runfiles.read_records(run_dir / runfiles.RESULTS)[0]] == [0]
    assert runfiles.load_resume(run_dir / runfiles.RESUME)["step"] == 0
    assert not (run_dir / runfiles.DONE).exists() and not (run_dir / runfiles.FAILED).exists()
    assert not (run_dir / runfiles.MODEL).exists()
    assert json.loads((run_dir / runfiles.LOCK).read_text())["claim_id"] == "theirs"
