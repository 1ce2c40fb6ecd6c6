"""Sweep specs, jobs and run states: validation errors, job lists and hashing, states from run dirs."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from math import comb
from pathlib import Path

import pytest

from domainfusion_bench import runfiles
from domainfusion_bench.cli import build_parser, main
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.protocol import seed_hash
from domainfusion_bench.sweep import (
    State, count_states, delete_incomplete, load_spec, make_jobs, parse_spec, print_status, run_state, train_argv,
)
from domainfusion_bench.training import TrainArgs

REPO = Path(__file__).resolve().parents[1]


def spec(tmp_path, **fields):
    base = dict(name="t", datasets=["RotatedDigits"], algorithms=["ERM"], n_hparams=2, n_trials=2,
                test_envs=[[0], [1]], steps=3, output_dir=str(tmp_path / "out"), data_dir=str(tmp_path / "data"))
    base.update(fields)
    return parse_spec(base)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------- specs


def test_job_list_order_seeds_and_counts(tmp_path):
    s = spec(tmp_path, algorithms=["ERM", "MixStyle"], n_hparams=3, n_hparams_from=1, n_trials=2, test_envs="singles+pairs")
    jobs = make_jobs(s)
    n = 6  # RotatedDigits domains
    assert len(jobs) == 2 * 2 * (n + comb(n, 2)) * 2
    first = [j.args for j in jobs[:8]]
    # DomainBed's order: trial x dataset x algorithm x test_envs x hparams_seed; pairs follow their single
    assert [(a.trial_seed, a.algorithm, a.test_envs, a.hparams_seed) for a in first[:6]] == [
        (0, "ERM", [0], 1), (0, "ERM", [0], 2), (0, "ERM", [0, 1], 1), (0, "ERM", [0, 1], 2),
        (0, "ERM", [0, 2], 1), (0, "ERM", [0, 2], 2)]
    a = jobs[0].args
    assert a.seed == seed_hash("RotatedDigits", "ERM", [0], 1, 0)
    assert a.steps == 3 and a.data_dir == str((tmp_path / "data").resolve())
    assert len({j.run_dir for j in jobs}) == len(jobs)
    assert all(j.run_dir.parent == (tmp_path / "out").resolve() for j in jobs)


def test_run_dir_ignores_data_and_output_dir_but_not_what_changes_the_result(tmp_path):
    names = lambda s: [j.run_dir.name for j in make_jobs(s)]  # noqa: E731
    base = names(spec(tmp_path))
    assert names(spec(tmp_path, data_dir="/elsewhere/data", output_dir=str(tmp_path / "moved"))) == base
    assert names(spec(tmp_path, train_args={"device": "cpu", "skip_model_save": True})) == base
    assert set(names(spec(tmp_path, steps=4))).isdisjoint(base)
    assert set(names(spec(tmp_path, hparams={"lr": 0.01}))).isdisjoint(base)


def test_fixed_hparams_and_grid_are_crossed_with_the_random_draws(tmp_path):
    s = spec(tmp_path, algorithms=["ERM", "MixStyle"], n_trials=1, test_envs=[[0]],
             hparams={"batch_size": 8}, grid={"mix_p": [0.1, 0.9]})
    jobs = make_jobs(s)
    erm = [j for j in jobs if j.args.algorithm == "ERM"]
    mix = [j for j in jobs if j.args.algorithm == "MixStyle"]
    # the grid axis belongs to MixStyle only: ERM gets 2 hparams seeds, MixStyle 2 seeds x 2 grid points
    assert len(erm) == 2 and len(mix) == 4
    assert [json.loads(j.args.hparams) for j in erm] == [{"batch_size": 8}] * 2
    assert sorted((j.args.hparams_seed, json.loads(j.args.hparams)["mix_p"]) for j in mix) == [
        (0, 0.1), (0, 0.9), (1, 0.1), (1, 0.9)]
    assert mix[0].grid_point == {"mix_p": 0.1} and "mix_p=0.1" in mix[0].describe()


def test_train_argv_parses_back_to_the_same_arguments(tmp_path):
    s = spec(tmp_path, hparams={"batch_size": 8}, train_args={"skip_model_save": True, "num_workers": 0},
             plugins=[str(write(tmp_path / "p.py", "# a plugin\n"))], test_envs=[[0, 2]])
    for job in make_jobs(s)[:2]:
        ns = build_parser().parse_args(train_argv(job.args))
        fields = {k: v for k, v in vars(ns).items() if k in TrainArgs.__dataclass_fields__}
        assert TrainArgs(**fields) == job.args
        assert job.command()[:3] == [sys.executable, "-m", "domainfusion_bench"]


def test_load_spec_with_cli_overrides(tmp_path):
    path = write(tmp_path / "mine.yaml", "datasets: DigitStyles\nalgorithms: all\nn_trials: 3\nsteps: 5\n"
                                         "hparams: {lr: 0.003, batch_size: 32}\n")
    s = load_spec(path, {"n_trials": 1, "steps": None, "test_envs": "singles", "hparams": {"lr": 1e-4}})
    assert s.hparams == {"lr": 1e-4, "batch_size": 32}  # --hparams changes lr, keeps the spec's batch_size
    assert s.name == "mine" and s.output_dir == str(Path("results") / "mine")
    assert s.n_trials == 1 and s.steps == 5  # None means "flag not given"
    assert {"ERM", "MixStyle", "EFDM"} <= set(s.algorithms)
    assert s.test_env_sets("DigitStyles") == [[0], [1], [2], [3]]


def test_exponent_notation_is_a_number_in_specs_and_flags(tmp_path):
    from domainfusion_bench.cli.sweep import _spec_from

    path = write(tmp_path / "e.yaml", "datasets: DigitStyles\nalgorithms: [ERM]\nhparams: {lr: 1e-4, weight_decay: 5E-5}\n")
    assert load_spec(path).hparams == {"lr": 1e-4, "weight_decay": 5e-5}
    ns = build_parser().parse_args(["sweep", "launch", "--spec", str(path), "--hparams", '{"lr": 3e-3}'])
    assert _spec_from(ns).hparams == {"lr": 3e-3, "weight_decay": 5e-5}


def test_shipped_specs_are_valid():
    demo = load_spec(REPO / "sweeps" / "demo.yaml")
    assert set(demo.algorithms) == set(__import__("domainfusion_bench.algorithms").algorithms.ALGORITHMS.names())
    assert demo.datasets == ["DigitStyles"] and demo.output_dir == str(Path("results") / "demo")
    published = load_spec(REPO / "sweeps" / "domainbed2020.yaml")
    assert (published.n_hparams, published.n_trials, published.test_envs) == (20, 3, "singles+pairs")
    assert {"PACS", "VLCS", "OfficeHome", "TerraIncognita", "DomainNet", "RotatedMNIST", "ColoredMNIST"} == set(
        published.datasets)
    jobs = make_jobs(published)
    pacs_erm = [j for j in jobs if j.args.dataset == "PACS" and j.args.algorithm == "ERM"]
    assert len(pacs_erm) == 3 * (4 + 6) * 20  # trials x (singles + pairs) x hparams seeds


@pytest.mark.parametrize("text, message", [
    ("datasets: [RotatedDigits]\nalgorithms: [ERM]\nn_trails: 2\n", "unknown key 'n_trails'. Did you mean 'n_trials'?"),
    ("datasets: [RotatedDigits]\nalgorithms: [ERN]\n", "unknown algorithm 'ERN'. Did you mean 'ERM'?"),
    ("datasets: [RotatedDigit]\nalgorithms: [ERM]\n", "unknown dataset 'RotatedDigit'"),
    ("datasets: [DigitStyles]\nalgorithms: [ERM]\ntest_envs: [[0], [4]]\n",
     "domain index 4 is out of range for DigitStyles, which has 4 domains (0..3: 0=poster"),
    ("datasets: [DigitStyles]\nalgorithms: [ERM]\ntest_envs: [[0, 1, 2, 3]]\n", "leaves no training domain"),
    ("datasets: [DigitStyles]\nalgorithms: [ERM]\ntest_envs: single\n", "Did you mean 'singles'?"),
    ("datasets: [RotatedDigits]\nalgorithms: [ERM]\nsteps: [1\n", "line 4, column 1: bad YAML"),
    ("datasets: [RotatedDigits]\nalgorithms: [ERM]\nsteps: 1\nsteps: 2\n", "key 'steps' given twice"),
    ("- RotatedDigits\n", "a sweep spec is a mapping"),
    ("datasets: [RotatedDigits]\n", "'algorithms' is required"),
    ("datasets: [RotatedDigits]\nalgorithms: [ERM]\nhparams: {lrr: 0.1}\n", "unknown hyperparameter 'lrr'"),
    ("datasets: [DigitStyles]\nalgorithms: [CDGA]\nhparams: {og_oracle_steps: 5}\n", "Did you mean 'og_judge_steps'"),
    ("datasets: [RotatedDigits]\nalgorithms: [ERM]\nn_hparams: 0\n", "n_hparams must be an integer >= 1"),
    ("datasets: [RotatedDigits]\nalgorithms: [ERM]\nn_hparams: 3\nn_hparams_from: 3\n", "must be above n_hparams_from"),
    ("datasets: [RotatedDigits]\nalgorithms: [ERM]\ngrid: {lr: 0.1}\n", "grid.lr must be a non-empty list"),
    ("datasets: [RotatedDigits]\nalgorithms: [ERM]\ntrain_args: {steps: 3}\n", "set by the sweep itself"),
    ("datasets: [RotatedDigits]\nalgorithms: [ERM]\ntrain_args: {devce: cpu}\n", "Did you mean 'device'?"),
])
def test_spec_errors_name_the_problem(tmp_path, text, message):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(DfbenchError) as err:
        load_spec(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_cli_spec_error_is_one_line(tmp_path, capsys):
    path = write(tmp_path / "bad.yaml", "datasets: [RotatedDigits]\nalgorithms: [ERN]\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "status", "--spec", str(path)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err
    assert err.startswith("dfbench sweep: error:") and "unknown algorithm 'ERN'" in err
    with pytest.raises(SystemExit):
        main(["sweep", "status", "--spec", str(tmp_path / "missing.yaml")])
    assert "cannot read sweep spec" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ states


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def lock(run_dir: Path, pid: int, host: str | None = None, age_s: float = 0.0) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"pid": pid, "host": host or socket.gethostname(), "started": time.time() - age_s - 1}
    (run_dir / runfiles.LOCK).write_text(json.dumps(info))
    if age_s:
        os.utime(run_dir / runfiles.LOCK, (time.time() - age_s, time.time() - age_s))


def test_states_from_run_dirs(tmp_path):
    d = lambda name: tmp_path / name  # noqa: E731
    assert run_state(d("none")).state == State.NOT_LAUNCHED

    d("done").mkdir()
    (d("done") / runfiles.DONE).write_text("done\n")
    assert run_state(d("done")).state == State.DONE

    lock(d("live"), os.getpid())
    assert run_state(d("live")) .state == State.RUNNING

    lock(d("dead"), dead_pid())
    (d("dead") / "err.txt").write_text("step 5 ...\nRuntimeError: CUDA out of memory\n")
    s = run_state(d("dead"))
    assert s.state == State.FAILED and "is gone" in s.reason and "CUDA out of memory" in s.reason

    d("failed").mkdir()
    (d("failed") / runfiles.FAILED).write_text(json.dumps({"error": "DfbenchError: loss became nan\n"}))
    s = run_state(d("failed"))
    assert s.state == State.FAILED and s.reason == "DfbenchError: loss became nan"

    d("interrupted").mkdir()
    (d("interrupted") / runfiles.RESULTS).write_text('{"step": 0}\n')
    assert run_state(d("interrupted")).state == State.FAILED

    # another host: the lock's heartbeat (mtime) decides
    lock(d("remote_fresh"), 1, host="node-a", age_s=30)
    lock(d("remote_stale"), 1, host="node-b", age_s=3600)
    assert run_state(d("remote_fresh")).state == State.RUNNING
    assert run_state(d("remote_stale")).state == State.FAILED


def test_a_reused_pid_does_not_look_alive(tmp_path):
    # our own pid, but a lock written long before this process started: the pid was reused
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time() - 10 * 24 * 3600}
    (run_dir / runfiles.LOCK).write_text(json.dumps(info))
    assert run_state(run_dir).state == State.FAILED


def test_status_and_delete_incomplete_never_touch_running_or_done_runs(tmp_path, capsys):
    s = spec(tmp_path, n_hparams=1, n_trials=1, test_envs=[[0], [1], [2], [3]])
    jobs = make_jobs(s)
    done, running, crashed, failed = (j.run_dir for j in jobs)
    done.mkdir(parents=True)
    (done / runfiles.DONE).write_text("done\n")
    (done / runfiles.RESULTS).write_text('{"step": 0}\n')
    lock(running, os.getpid())
    lock(crashed, dead_pid())
    failed.mkdir()
    (failed / runfiles.FAILED).write_text(json.dumps({"error": "ValueError: bad thing"}))

    counts = print_status(s, jobs)
    out = capsys.readouterr().out
    assert counts == {State.DONE: 1, State.RUNNING: 1, State.FAILED: 2, State.NOT_LAUNCHED: 0}
    assert "ValueError: bad thing" in out and failed.name in out

    with pytest.raises(DfbenchError, match="pass --yes"):
        delete_incomplete(jobs, yes=False)  # stdin is not a terminal under pytest
    removed = delete_incomplete(jobs, yes=True)
    assert sorted(removed) == sorted([crashed, failed])
    assert done.exists() and running.exists() and not crashed.exists() and not failed.exists()
    assert count_states([run_state(j.run_dir) for j in jobs])[State.NOT_LAUNCHED] == 2


def test_cli_status_and_delete(tmp_path, capsys):
    path = write(tmp_path / "s.yaml", f"datasets: [RotatedDigits]\nalgorithms: [ERM]\nn_hparams: 1\nn_trials: 1\n"
                                      f"test_envs: [[0], [1]]\noutput_dir: {tmp_path / 'out'}\n")
    jobs = make_jobs(load_spec(path))
    lock(jobs[1].run_dir, dead_pid())
    main(["sweep", "status", "--spec", str(path)])
    out = capsys.readouterr().out
    counts = dict(re.findall(r"^  (done|running|failed|not launched) +(\d+)$", out, re.M))
    assert "2 jobs" in out and counts == {"done": "0", "running": "0", "failed": "1", "not launched": "1"}
    assert "is gone" in out
    main(["sweep", "delete-incomplete", "--spec", str(path), "--yes"])
    assert not jobs[1].run_dir.exists() and "deleted 1 run dirs" in capsys.readouterr().out
    # an override changes the job list: three trials now
    main(["sweep", "status", "--spec", str(path), "--n_trials", "3", "--test_envs", "[[2]]"])
    assert "3 jobs" in capsys.readouterr().out


def test_a_done_run_made_under_other_defaults_is_not_counted_done(tmp_path):
    from domainfusion_bench.sweep import job_states
    from domainfusion_bench.training import resolve_hparams, run_fingerprint

    job = make_jobs(spec(tmp_path, algorithms=["ERM"], test_envs=[[0]]))[0]
    job.run_dir.mkdir(parents=True)
    (job.run_dir / runfiles.DONE).write_text("")
    fingerprint = run_fingerprint(job.args, resolve_hparams(job.args))
    runfiles.write_fingerprint(job.run_dir, fingerprint)
    assert job_states([job])[0].state == State.DONE
    older = {**fingerprint, "hparams_resolved": {**fingerprint["hparams_resolved"], "cnn_width": 7}}
    runfiles.write_fingerprint(job.run_dir, older)  # same arguments (same hash), another default then
    state = job_states([job])[0]
    assert state.state == State.FAILED and "another configuration" in state.reason and "cnn_width" in state.reason


def test_delete_incomplete_removes_a_stale_run_and_says_how_many_are_stale(tmp_path, monkeypatch, capsys):
    from domainfusion_bench.training import resolve_hparams, run_fingerprint

    jobs = make_jobs(spec(tmp_path, n_hparams=1, n_trials=1, test_envs=[[0], [1], [2]]))
    stale, current, crashed = (j.run_dir for j in jobs)
    for job in jobs[:2]:
        job.run_dir.mkdir(parents=True)
        (job.run_dir / runfiles.DONE).write_text("done\n")
        fingerprint = run_fingerprint(job.args, resolve_hparams(job.args))
        if job is jobs[0]:
            fingerprint["hparams_resolved"]["cnn_width"] = 7  # made under another default
        runfiles.write_fingerprint(job.run_dir, fingerprint)
    lock(crashed, dead_pid())
    with pytest.raises(DfbenchError, match=r"2 run dirs \(1 of them stale: done under another configuration\) "
                                           r"would be deleted; pass --yes"):
        delete_incomplete(jobs, yes=False)
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: capsys.readouterr() and print(prompt) or "n")
    assert delete_incomplete(jobs, yes=False) == []
    assert "delete these 2 run dirs (1 of them stale" in capsys.readouterr().out
    assert sorted(delete_incomplete(jobs, yes=True)) == sorted([stale, crashed])
    assert current.exists() and not stale.exists()


def test_a_spec_for_many_algorithms_runs_with_a_subset_of_them(tmp_path):
    # the demo spec fixes DiTi's and DomainFusion's hyperparameters; `--algorithms ERM` must still work
    jobs = make_jobs(spec(tmp_path, datasets=["DigitStyles"], algorithms=["ERM"], test_envs=[[2]],
                          hparams={"lr": 0.003, "diti_encoder_width": 16, "df_ld_batch": 32}))
    assert {json.loads(j.args.hparams)["lr"] for j in jobs} == {0.003}
    assert all(set(json.loads(j.args.hparams)) == {"lr"} for j in jobs)
    with pytest.raises(DfbenchError, match="no registered algorithm has it"):
        spec(tmp_path, hparams={"diti_encoder_widht": 16})


PLUGIN = """
from pathlib import Path
from domainfusion_bench.algorithms import register_algorithm
from domainfusion_bench.algorithms.erm import ERM

Path(__file__).with_name("plugin_ran").write_text("yes")  # the side effect a spec's code may have


@register_algorithm("PluginERM")
class PluginERM(ERM):
    pass
"""


def test_a_specs_plugins_run_only_when_it_is_launched_or_trusted(tmp_path, monkeypatch, capsys):
    from domainfusion_bench.algorithms import ALGORITHMS

    monkeypatch.setattr(ALGORITHMS, "_entries", dict(ALGORITHMS._entries))  # the plugin's name stays in this test
    plugin, ran = write(tmp_path / "plugin.py", PLUGIN), tmp_path / "plugin_ran"
    path = write(tmp_path / "s.yaml", f"datasets: [RotatedDigits]\nalgorithms: [PluginERM]\nn_hparams: 1\n"
                                      f"n_trials: 1\ntest_envs: [[0]]\nplugins: [{plugin}]\n"
                                      f"output_dir: {tmp_path / 'out'}\n")
    s = load_spec(path)  # parsed, not run
    assert s.algorithms == ["PluginERM"] and not ran.exists()
    for argv in (["sweep", "status", "--spec", str(path)],
                 ["sweep", "launch", "--spec", str(path), "--launcher", "dry_run"],
                 ["sweep", "delete-incomplete", "--spec", str(path), "--yes"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert re.search(r"PluginERM is not built in .* plugins .* which are code: dfbench runs them only to launch "
                         r"the sweep.*--trust-plugins", capsys.readouterr().err)
        assert not ran.exists()
    main(["sweep", "status", "--spec", str(path), "--trust-plugins"])
    assert ran.exists() and "1 jobs" in capsys.readouterr().out


def test_a_plugins_algorithm_or_hparam_typo_is_caught_once_the_plugins_run(tmp_path, monkeypatch):
    from domainfusion_bench.algorithms import ALGORITHMS
    from domainfusion_bench.sweep import with_plugins

    monkeypatch.setattr(ALGORITHMS, "_entries", dict(ALGORITHMS._entries))
    plugin = str(write(tmp_path / "plugin.py", PLUGIN))
    typo = spec(tmp_path, algorithms=["PluginERM"], plugins=[plugin], hparams={"lr_typo": 1})  # maybe the plugin's
    with pytest.raises(DfbenchError, match="unknown hyperparameter 'lr_typo' .*no registered algorithm has it"):
        with_plugins(typo)
    with pytest.raises(DfbenchError, match="algorithms: .*PluginERN.*after loading the plugins"):
        with_plugins(spec(tmp_path, algorithms=["PluginERN"], plugins=[plugin]))
    with pytest.raises(DfbenchError, match="algorithms: "):  # no plugins: a typo is caught at parse time
        spec(tmp_path, algorithms=["PluginERN"])
    assert with_plugins(spec(tmp_path, algorithms="all", plugins=[plugin])).algorithms[-1] == "PluginERM"
