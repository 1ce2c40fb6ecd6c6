"""Every bad input is one clear line (``dfbench <command>: error: ...``), exit code != 0, no traceback.

Run in-process through the CLI's ``main`` (fast); none of these trains or downloads anything.
"""

import json

import pytest

from domainfusion_bench.cli import main

SPEC = "datasets: [RotatedDigits]\nalgorithms: [ERM]\nn_hparams: 1\nn_trials: 1\nsteps: 2\n"

TRAIN = ["train", "--device", "cpu", "--num_workers", "0"]


def _hp(value):
    return [*TRAIN, "--hparams", json.dumps(value)]


BAD = {
    # train: names, JSON, hyperparameter types and ranges, argument ranges
    "train unknown algorithm": ([*TRAIN, "--algorithm", "NoSuchAlgo"], "unknown algorithm"),
    "train unknown dataset": ([*TRAIN, "--dataset", "NoSuchSet"], "unknown dataset"),
    "train test env out of range": ([*TRAIN, "--test_envs", "9"], "--test_envs [9] is not valid"),
    "train negative test env": ([*TRAIN, "--test_envs", "-1"], "--test_envs must be"),
    "train repeated test env": ([*TRAIN, "--test_envs", "1", "1"], "distinct"),
    "train hparams not JSON": ([*TRAIN, "--hparams", "{lr: 1}"], "not valid JSON"),
    "train hparams not an object": ([*TRAIN, "--hparams", "[1, 2]"], "must be a JSON object"),
    "train unknown hparam": (_hp({"lrr": 0.1}), "unknown hyperparameter(s) lrr"),
    "train renamed hparam": ([*TRAIN, "--algorithm", "CDGA", "--hparams", '{"og_oracle_steps": 5}'],
                             "og_oracle_steps is now og_judge_steps"),
    "train lr a string": (_hp({"lr": "fast"}), "lr for ERM on RotatedDigits must be a number"),
    "train lr negative": (_hp({"lr": -0.1}), "lr for ERM on RotatedDigits must be > 0"),
    "train lr zero": (_hp({"lr": 0}), "must be > 0"),
    "train lr NaN": ([*TRAIN, "--hparams", '{"lr": NaN}'], "finite"),
    "train batch size zero": (_hp({"batch_size": 0}), "batch_size for ERM on RotatedDigits must be >= 1"),
    "train batch size fractional": (_hp({"batch_size": 2.5}), "must be an integer"),
    "train batch size boolean": (_hp({"batch_size": True}), "must be a number"),
    "train boolean as string": (_hp({"data_augmentation": "yes"}), "true or false"),
    "train boolean as number": (_hp({"freeze_bn": 1}), "true or false"),
    "train string as number": (_hp({"backbone": 3}), "must be a string"),
    "train weight decay negative": (_hp({"weight_decay": -1e-4}), "weight_decay for ERM on RotatedDigits must be >= 0"),
    "train dropout one": (_hp({"resnet_dropout": 1.0}), "resnet_dropout for ERM on RotatedDigits must be >= 0 and < 1"),
    "train cnn width zero": (_hp({"cnn_width": 0}), "cnn_width"),
    "train steps zero": ([*TRAIN, "--steps", "0"], "--steps must be an integer >= 1"),
    "train checkpoint freq zero": ([*TRAIN, "--checkpoint_freq", "0"], "--checkpoint_freq must be an integer >= 1"),
    "train holdout above one": ([*TRAIN, "--holdout_fraction", "1.5"], "--holdout_fraction must be a number between 0 and 1"),
    "train holdout zero": ([*TRAIN, "--holdout_fraction", "0"], "--holdout_fraction"),
    "train negative workers": (["train", "--device", "cpu", "--num_workers", "-1"], "--num_workers must be"),
    "train eval batch size zero": ([*TRAIN, "--eval_batch_size", "0"], "--eval_batch_size must be"),
    "train negative seed": ([*TRAIN, "--hparams_seed", "-3"], "--hparams_seed must be"),
    "train unknown device": (["train", "--device", "tpu"], "--device must be auto | cpu | cuda | cuda:N"),
    "train missing plugin": ([*TRAIN, "--plugins", "/nonexistent/plugin.py"], "plugin file"),
    "train data not downloaded": ([*TRAIN, "--dataset", "PACS", "--data_dir", "/nonexistent"], "dfbench download PACS"),
    "train into another configuration's dir": ([*TRAIN, "--output_dir", "{other_run}"], "holds another configuration"),
    # sweep
    "sweep missing spec": (["sweep", "status", "--spec", "/nonexistent/spec.yaml"], "cannot read sweep spec"),
    "sweep bad YAML": (["sweep", "status", "--spec", "{bad_yaml}"], "bad YAML"),
    "sweep unknown key": (["sweep", "status", "--spec", "{unknown_key}"], "unknown key 'n_trial'"),
    "sweep n_hparams zero": (["sweep", "status", "--spec", "{spec}", "--n_hparams", "0"], "n_hparams must be"),
    "sweep negative steps": (["sweep", "status", "--spec", "{spec}", "--steps", "-5"], "steps must be an integer >= 1"),
    "sweep bad test envs": (["sweep", "status", "--spec", "{spec}", "--test_envs", "[[9]]"], "out of range"),
    "sweep hparam out of range": (["sweep", "status", "--spec", "{spec}", "--hparams", '{"lr": -1}'], "must be > 0"),
    "sweep hparam wrong type": (["sweep", "status", "--spec", "{spec}", "--hparams", '{"batch_size": "big"}'],
                                "must be a number"),
    "sweep grid value out of range": (["sweep", "status", "--spec", "{grid_spec}"], "batch_size"),
    "sweep bad train_args": (["sweep", "status", "--spec", "{train_args_spec}"], "--device must be"),
    "sweep unknown launcher": (["sweep", "launch", "--spec", "{spec}", "--launcher", "nosuch"], "unknown launcher"),
    "sweep option without =": (["sweep", "launch", "--spec", "{spec}", "-O", "parallel"], "KEY=VALUE"),
    "sweep parallel zero": (["sweep", "launch", "--spec", "{spec}", "-O", "parallel=0"], "parallel must be"),
    "sweep unknown option": (["sweep", "launch", "--spec", "{spec}", "-O", "paralel=2"], "Did you mean 'parallel'"),
    # collect
    "collect missing dir": (["collect", "/nonexistent/sweep"], "does not exist"),
    "collect a file, not a dir": (["collect", "{a_file}"], "not a directory"),
    # download
    "download unknown dataset": (["download", "NoSuchSet"], "unknown"),
    "download missing mirror": (["download", "VLCS", "--mirror", "/nonexistent/mirror", "--data_dir", "{tmp}"], "mirror"),
    # bench
    "bench collect zero records": (["bench", "--collect", "0"], "--collect must be"),
    "bench unknown dataset": (["bench", "--dataset", "NoSuchSet", "--device", "cpu"], "unknown dataset"),
    "bench bad hparams": (["bench", "--hparams", "{bad", "--device", "cpu"], "not valid JSON"),
    "bench zero steps": (["bench", "--steps", "0", "--device", "cpu"], "--steps must be"),
    "bench zero batch size": (["bench", "--batch_size", "0", "--device", "cpu"], "--batch_size must be"),
}


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC)
    (tmp_path / "bad.yaml").write_text("datasets: [RotatedDigits\n")
    (tmp_path / "unknown.yaml").write_text(SPEC + "n_trial: 2\n")
    (tmp_path / "grid.yaml").write_text(SPEC + "grid:\n  batch_size: [8, -8]\n")
    (tmp_path / "train_args.yaml").write_text(SPEC + "train_args:\n  device: tpu\n")
    (tmp_path / "file.txt").write_text("x")
    other = tmp_path / "other_run"
    other.mkdir()
    (other / "fingerprint.json").write_text(json.dumps({"dataset": "ColoredDigits"}))
    return {"spec": tmp_path / "spec.yaml", "bad_yaml": tmp_path / "bad.yaml", "unknown_key": tmp_path / "unknown.yaml",
            "grid_spec": tmp_path / "grid.yaml", "train_args_spec": tmp_path / "train_args.yaml",
            "a_file": tmp_path / "file.txt", "other_run": other, "tmp": tmp_path}


def test_the_list_is_long_enough():
    assert len(BAD) >= 30
    assert {argv[0] for argv, _ in BAD.values()} == {"train", "sweep", "collect", "download", "bench"}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_clear_line(name, paths, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    argv, message = BAD[name]
    for key, value in paths.items():
        argv = [a.replace("{" + key + "}", str(value)) for a in argv]
    if argv[0] == "train" and "--output_dir" not in argv:
        argv += ["--output_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dfbench {argv[0]}: error: ") and message in lines[0], lines[0]
