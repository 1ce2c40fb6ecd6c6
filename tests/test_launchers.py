"""Launchers: argument lists, failures that do not stop the others, slurm through submitit's local
executor, and a real sweep killed mid-run, relaunched and collected (no loss, no duplicate record)."""

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from domainfusion_bench import launchers, runfiles, sweep
from domainfusion_bench.cli import main
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.launchers import LAUNCHERS, Outcome, SubmititRun, launch_sweep, make_launcher
from domainfusion_bench.sweep import State, job_states, load_spec, make_jobs, parse_spec, with_plugins

# A stand-in for `python -m domainfusion_bench train`: no torch, so a launcher test costs milliseconds.
# test env 0 and 3: a run that succeeds (and notes its environment); 1: exits with an error; 2: killed.
FAKE_TRAINER = textwrap.dedent("""
    import json, os, signal, sys, time
    argv = sys.argv[2:]
    arg = lambda name: argv[argv.index("--" + name) + 1]
    run_dir, env = arg("output_dir"), int(arg("test_envs"))
    os.makedirs(run_dir, exist_ok=True)
    if env == 1:
        print("Traceback (most recent call last):\\nValueError: broken on purpose", file=sys.stderr)
        sys.exit(3)
    if env == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    seen = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")}
    with open(os.path.join(run_dir, "results.jsonl"), "w") as f:
        f.write(json.dumps({"step": 0, "env": seen, "argv": sys.argv[1:]}) + "\\n")
    open(os.path.join(run_dir, "done"), "w").write("done\\n")
""")


@pytest.fixture
def fake_trainer(tmp_path, monkeypatch):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    prefix = lambda: [sys.executable, str(script)]  # noqa: E731
    monkeypatch.setattr(sweep.jobs, "module_prefix", prefix)  # Job.command
    monkeypatch.setattr(launchers.local, "module_prefix", prefix)  # the pool launchers
    return script


def four_runs(tmp_path, **fields):
    base = dict(name="fake", datasets=["DigitStyles"], algorithms=["ERM"], n_hparams=1, n_trials=1,
                test_envs=[[0], [1], [2], [3]], steps=2, output_dir=str(tmp_path / "out"))
    base.update(fields)
    return parse_spec(base)


def first_record(job):
    records, _ = runfiles.read_records(job.run_dir / runfiles.RESULTS)
    return records[0]


@pytest.mark.parametrize("options", [{"preload": False}, {"preload": False, "parallel": 2, "threads": 1}])
def test_local_launcher_a_failed_run_does_not_stop_the_others(tmp_path, fake_trainer, options, capsys):
    spec = four_runs(tmp_path)
    jobs = make_jobs(spec)
    result = launch_sweep(spec, "local", options)
    assert result.outcomes == {Outcome.DONE: 2, Outcome.FAILED: 2, Outcome.SKIPPED: 0}
    states = job_states(jobs)
    assert [s.state for s in states] == [State.DONE, State.FAILED, State.FAILED, State.DONE]
    assert states[1].reason == "exit status 3: ValueError: broken on purpose"
    assert states[2].reason.startswith("killed by signal 9 (SIGKILL)")
    assert not any((j.run_dir / runfiles.LOCK).exists() for j in jobs)  # no lock left behind
    # the child got the argument list itself (no shell), and the thread count when asked
    record = first_record(jobs[0])
    assert record["argv"] == jobs[0].train_argv()
    assert record["env"]["OMP_NUM_THREADS"] == ("1" if "threads" in options else os.environ.get("OMP_NUM_THREADS"))
    err = capsys.readouterr().err
    assert "FAILED" in err and "broken on purpose" in err and "2 done, 0 running, 2 failed" in err

    # relaunching runs only what is not done
    assert launch_sweep(spec, "local", {"preload": False}).outcomes[Outcome.DONE] == 0
    assert first_record(jobs[0]) == record


def test_preloaded_local_runs_a_failing_algorithm_next_to_a_working_one(tmp_path):
    plugin = tmp_path / "broken.py"
    plugin.write_text(textwrap.dedent("""
        from domainfusion_bench.algorithms import register_algorithm
        from domainfusion_bench.algorithms.erm import ERM

        @register_algorithm("Broken")
        class Broken(ERM):
            def update(self, minibatches):
                raise RuntimeError("broken on purpose")
    """))
    spec = four_runs(tmp_path, datasets=["RotatedDigits"], algorithms=["Broken", "ERM"], plugins=[str(plugin)],
                     test_envs=[[0]], steps=2, hparams={"batch_size": 8, "cnn_width": 16},
                     train_args={"num_workers": 0, "skip_model_save": True, "device": "cpu"})
    result = launch_sweep(spec, "local", {"threads": 1})
    assert result.outcomes == {Outcome.DONE: 1, Outcome.FAILED: 1, Outcome.SKIPPED: 0}
    broken, erm = make_jobs(spec)
    assert sweep.run_state(broken.run_dir).reason == "RuntimeError: broken on purpose"
    assert "RuntimeError: broken on purpose" in (broken.run_dir / launchers.LAUNCH_LOG).read_text()
    assert [r["step"] for r in runfiles.read_records(erm.run_dir / runfiles.RESULTS)[0]] == [0, 1]
    assert not (erm.run_dir / runfiles.LOCK).exists() and not (broken.run_dir / runfiles.LOCK).exists()


def test_multi_gpu_gives_each_child_one_gpu(tmp_path, fake_trainer):
    spec = four_runs(tmp_path, test_envs=[[0], [3]], n_hparams=2)
    result = launch_sweep(spec, "multi_gpu", {"gpus": "4,7"})
    assert result.outcomes[Outcome.DONE] == 4
    assert {first_record(j)["env"]["CUDA_VISIBLE_DEVICES"] for j in make_jobs(spec)} <= {"4", "7"}


def test_a_running_run_is_left_alone(tmp_path, fake_trainer):
    spec = four_runs(tmp_path, test_envs=[[0]])
    job = make_jobs(spec)[0]
    job.run_dir.mkdir(parents=True)
    info = {"pid": os.getpid(), "host": __import__("socket").gethostname(), "started": time.time() - 1}
    (job.run_dir / runfiles.LOCK).write_text(json.dumps(info))
    assert launch_sweep(spec, "local", {"preload": False}).outcomes == {o: 0 for o in Outcome}
    assert not (job.run_dir / runfiles.RESULTS).exists()


def test_launch_reruns_a_stale_run(tmp_path, fake_trainer, capsys):
    from domainfusion_bench.training import resolve_hparams, run_fingerprint

    spec = four_runs(tmp_path, test_envs=[[0]])
    job = make_jobs(spec)[0]
    job.run_dir.mkdir(parents=True)
    (job.run_dir / runfiles.RESULTS).write_text(json.dumps({"step": 0, "env0_in_acc": 0.99}) + "\n")
    (job.run_dir / runfiles.DONE).write_text("done\n")
    fingerprint = run_fingerprint(job.args, resolve_hparams(job.args))
    runfiles.write_fingerprint(job.run_dir, {**fingerprint, "holdout_fraction": 0.5})  # made under another one
    assert job_states([job])[0].stale
    assert launch_sweep(spec, "local", {"preload": False}).outcomes[Outcome.DONE] == 1
    assert "env0_in_acc" not in first_record(job) and "argv" in first_record(job)  # the rerun's, not the old
    assert not (job.run_dir / runfiles.FINGERPRINT).exists() and job_states([job])[0].state == State.DONE
    assert "1 stale run(s), done under another configuration, are rerun" in capsys.readouterr().err


@pytest.mark.parametrize("options, where", [
    ({"additional": {"constraint": "a100\nrm -rf ~"}}, "additional.constraint"),
    ({"additional": {"account": "lab\r"}}, "additional.account"),
    ({"additional": {"comment": "a\x00b"}}, "additional.comment"),
    ({"additional": {"comment": "\x1b[2J"}}, "additional.comment"),
    ({"partition": "gpu\n#SBATCH --wrap=sh"}, "partition"),
])
def test_sbatch_values_with_control_characters_are_refused(tmp_path, options, where):
    spec = four_runs(tmp_path, launcher="slurm", launcher_options={"slurm": {**options, "cluster": "local"}})
    with pytest.raises(DfbenchError, match=rf"{where} holds a control character .* refused"):
        launch_sweep(spec)  # before anything is submitted
    assert not (tmp_path / "out").exists()
    clean = four_runs(tmp_path)
    with pytest.raises(DfbenchError, match="not an sbatch option name"):
        make_launcher(clean, "slurm", {"additional": {"constraint\n": "a100"}}).check()
    make_launcher(clean, "slurm", {"additional": {"constraint": "a100|h100", "nice": 10}}).check()


def test_launching_a_sweep_runs_its_plugins(tmp_path, fake_trainer, monkeypatch):
    from domainfusion_bench.algorithms import ALGORITHMS

    monkeypatch.setattr(ALGORITHMS, "_entries", dict(ALGORITHMS._entries))
    plugin = tmp_path / "plugin.py"
    plugin.write_text("from pathlib import Path\nfrom domainfusion_bench.algorithms import register_algorithm\n"
                      "from domainfusion_bench.algorithms.erm import ERM\n"
                      "Path(__file__).with_name('plugin_ran').write_text('yes')\n"
                      "register_algorithm('PluginERM')(type('PluginERM', (ERM,), {}))\n")
    spec = four_runs(tmp_path, algorithms=["PluginERM"], plugins=[str(plugin)], test_envs=[[0]])
    assert not (tmp_path / "plugin_ran").exists()  # parsing ran nothing
    assert launch_sweep(spec, "local", {"preload": False}).outcomes[Outcome.DONE] == 1
    assert (tmp_path / "plugin_ran").exists()


def test_dry_run_prints_argument_lists(tmp_path, capsys):
    spec = four_runs(tmp_path, algorithms=["ERM", "CDGA*"], hparams={"batch_size": 8})
    launch_sweep(spec, "dry_run")
    lines = capsys.readouterr().out.strip().splitlines()
    jobs = make_jobs(spec)
    assert [shlex.split(line) for line in lines] == [j.command() for j in jobs]
    assert "'CDGA*'" in lines[-1] and """--hparams '{"batch_size": 8}'""" in lines[-1]
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written
    main(["sweep", "launch", "--spec", str(write_spec(tmp_path)), "--launcher", "dry_run", "-O", "prefix=dfbench"])
    assert capsys.readouterr().out.startswith("dfbench train --dataset RotatedDigits")


def write_spec(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(f"datasets: [RotatedDigits]\nalgorithms: [ERM]\nn_hparams: 1\nn_trials: 1\n"
                    f"test_envs: [[0]]\noutput_dir: {tmp_path / 'cli_out'}\n")
    return path


def test_launcher_registry_and_options(tmp_path):
    assert set(LAUNCHERS.names()) == {"local", "multi_gpu", "accelerate", "slurm", "dry_run"}
    spec = four_runs(tmp_path, launcher_options={"accelerate": {"gpus": 2}})
    prefix = make_launcher(spec, "accelerate").prefix()
    assert prefix[:3] == [sys.executable, "-m", "accelerate.commands.launch"] and prefix[-2:] == ["-m", "domainfusion_bench"]
    assert prefix[prefix.index("--num_processes") + 1] == "2" and "--multi_gpu" in prefix
    with pytest.raises(DfbenchError, match="has no option 'paralel'. Did you mean 'parallel'"):
        make_launcher(spec, "local", {"paralel": 2})
    with pytest.raises(DfbenchError, match="unknown launcher 'slurmm'. Did you mean 'slurm'"):
        make_launcher(spec, "slurmm")
    with pytest.raises(DfbenchError, match="parallel must be an integer >= 1"):
        make_launcher(spec, "local", {"parallel": 0}).launch([])
    with pytest.raises(SystemExit):
        main(["sweep", "launch", "--spec", str(write_spec(tmp_path)), "-O", "parallel"])


def test_slurm_launcher_through_submitits_local_executor(tmp_path, fake_trainer, capsys):
    spec = four_runs(tmp_path, test_envs=[[0], [1]])
    options = {"cluster": "local", "gpus": 0, "poll_s": 0.2, "heartbeat_s": 0.2, "time": 5}
    result = launch_sweep(spec, "slurm", options)
    assert result.outcomes == {Outcome.DONE: 1, Outcome.FAILED: 1, Outcome.SKIPPED: 0}
    assert result.failures[0][1] == "exit status 3: ValueError: broken on purpose"
    ok, failed = make_jobs(spec)
    assert first_record(ok)["argv"] == ok.train_argv()
    assert run_state_of(failed) == State.FAILED and not (ok.run_dir / runfiles.LOCK).exists()
    assert any((tmp_path / "out" / ".submitit").rglob("*_submitted.pkl"))
    # pre-emption: submitit's checkpoint hook requeues the same command, which resumes the run
    run = SubmititRun(ok.command(), str(ok.run_dir))
    again = run.checkpoint().function
    assert (again.command, again.run_dir, again.requeued) == (run.command, run.run_dir, True)
    assert run() == "done already"


def run_state_of(job):
    return sweep.run_state(job.run_dir).state


# ---------------------------------------------------------------------- a real sweep, killed

# ERM that, while $DFBENCH_TEST_STALL names a folder, makes the first run to reach its 7th step wait
# there (after its step-5 checkpoint) until it is killed: a deterministic "mid-run" for the kill below.
PAUSABLE = textwrap.dedent("""
    import os, time
    from domainfusion_bench.algorithms import register_algorithm
    from domainfusion_bench.algorithms.erm import ERM

    @register_algorithm("PausableERM")
    class PausableERM(ERM):
        def update(self, minibatches):
            self.updates = getattr(self, "updates", 0) + 1
            folder = os.environ.get("DFBENCH_TEST_STALL")
            if folder and self.updates == 7:
                try:
                    fd = os.open(os.path.join(folder, "stalled"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    fd = None
                if fd is not None:
                    os.write(fd, str(os.getpid()).encode())
                    os.close(fd)
                    while True:
                        time.sleep(1)
            return super().update(minibatches)
""")


@pytest.mark.slow
def test_sweep_killed_mid_run_resumes_without_loss_or_duplicates(tmp_path):
    from domainfusion_bench import training
    from domainfusion_bench.report import leaderboard

    plugin = tmp_path / "pausable.py"
    plugin.write_text(PAUSABLE)
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(textwrap.dedent(f"""
        datasets: [RotatedDigits]
        algorithms: [ERM, PausableERM]
        plugins: [{plugin}]
        test_envs: [[0], [1]]
        n_hparams: 1
        n_trials: 2
        steps: 11
        checkpoint_freq: 5
        hparams: {{batch_size: 8, cnn_width: 16}}
        output_dir: {tmp_path / 'sweep'}
        train_args: {{num_workers: 0, skip_model_save: true, device: cpu}}
        launcher_options: {{local: {{parallel: 2, threads: 1}}}}
    """))
    spec = with_plugins(load_spec(spec_path))  # the test trusts its own plugin (a launch would run it)
    jobs = make_jobs(spec)
    assert len(jobs) == 8

    stall = tmp_path / "stall"
    stall.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "domainfusion_bench", "sweep", "launch", "--spec", str(spec_path)],
                            env={**os.environ, "DFBENCH_TEST_STALL": str(stall)}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (stall / "stalled").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert (stall / "stalled").exists(), proc.stderr.read() if proc.poll() is not None else "timed out"
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its runs die at once, like a lost machine
    proc.wait()
    stalled_pid, deadline = int((stall / "stalled").read_text()), time.time() + 30
    pids = [json.loads((j.run_dir / runfiles.LOCK).read_text())["pid"] for j in jobs if (j.run_dir / runfiles.LOCK).exists()]
    while any(runfiles.pid_alive(p) for p in pids + [stalled_pid]) and time.time() < deadline:
        time.sleep(0.1)  # SIGKILL completes asynchronously: the run beside the stalled one dies too

    states = job_states(jobs)
    stalled = next(j for j in jobs if (j.run_dir / runfiles.LOCK).exists()
                   and json.loads((j.run_dir / runfiles.LOCK).read_text())["pid"] == stalled_pid)
    assert sweep.run_state(stalled.run_dir).state == State.FAILED  # its lock's process is gone
    assert "is gone" in sweep.run_state(stalled.run_dir).reason
    assert [r["step"] for r in runfiles.read_records(stalled.run_dir / runfiles.RESULTS)[0]] == [0, 5]
    assert (stalled.run_dir / runfiles.RESUME).exists()
    done_before = {j.run_dir: (j.run_dir / runfiles.RESULTS).read_text() for j, s in zip(jobs, states)
                   if s.state == State.DONE}
    assert done_before and sum(s.state == State.NOT_LAUNCHED for s in states) > 0

    result = launch_sweep(load_spec(spec_path))  # relaunch, same spec, no stall
    assert result.outcomes[Outcome.FAILED] == 0
    assert result.outcomes[Outcome.DONE] == 8 - len(done_before)
    assert all(s.state == State.DONE for s in job_states(jobs))
    for run_dir, text in done_before.items():  # done runs were not run again
        assert (run_dir / runfiles.RESULTS).read_text() == text
    for job in jobs:
        records, skipped = runfiles.read_records(job.run_dir / runfiles.RESULTS)
        assert skipped == 0 and [r["step"] for r in records] == [0, 5, 10]
    assert "resuming from step 6" in (stalled.run_dir / "out.txt").read_text()

    # the same sweep, never interrupted (in this process, one thread like the launched runs)
    import dataclasses

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for job in jobs:
            training.train(dataclasses.replace(job.args, output_dir=str(tmp_path / "uninterrupted" / job.run_dir.name)))
    finally:
        torch.set_num_threads(threads)
    accs = lambda run_dir: [{k: v for k, v in r.items() if k.endswith("_acc")}  # noqa: E731
                            for r in runfiles.read_records(run_dir / runfiles.RESULTS)[0]]
    for job in jobs:
        assert accs(job.run_dir) == accs(tmp_path / "uninterrupted" / job.run_dir.name)
    table = leaderboard(tmp_path / "sweep", "text", selection=["iid", "oracle"])
    assert table == leaderboard(tmp_path / "uninterrupted", "text", selection=["iid", "oracle"])
    assert "PausableERM" in table and "RotatedDigits" in table


def test_pipeline_order_starts_one_generative_run_then_fills_slots_with_the_others(tmp_path):
    spec = four_runs(tmp_path, algorithms=["ERM", "CDGA", "DiTi", "MixStyle"], n_trials=2, test_envs=[[2]])
    jobs = make_jobs(spec)  # DomainBed's order: trial 0's four algorithms, then trial 1's
    order = [(j.args.algorithm, j.args.trial_seed) for j in launchers.pipeline_order(jobs)]
    assert order == [("CDGA", 0), ("ERM", 0), ("MixStyle", 0), ("ERM", 1), ("MixStyle", 1),
                     ("CDGA", 1), ("DiTi", 0), ("DiTi", 1)]
    assert sorted(map(id, launchers.pipeline_order(jobs))) == sorted(map(id, jobs))  # a permutation
    erm_only = make_jobs(four_runs(tmp_path))
    assert launchers.pipeline_order(erm_only) == erm_only
