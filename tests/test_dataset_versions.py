"""A rebuilt embedded dataset (DigitStyles v2) never mixes with runs of its earlier version: other run
hashes and fingerprints, and the collector keeps the two apart."""

import dataclasses
import json
import warnings

from domainfusion_bench import runfiles
from domainfusion_bench.collect import load_records
from domainfusion_bench.data import run_identity
from domainfusion_bench.protocol import run_hash
from domainfusion_bench.training import TrainArgs


def test_a_rebuilt_dataset_gets_other_run_hashes_and_old_ones_stay():
    new = dataclasses.asdict(TrainArgs(dataset="DigitStyles", output_dir="x"))
    assert run_identity(new)["dataset_version"] == 2
    assert run_hash(run_identity(new)) != run_hash(new)
    old = dataclasses.asdict(TrainArgs(dataset="RotatedDigits", output_dir="x"))
    assert run_identity(old) == old  # version 1: hashes of existing sweeps do not move


def _run(root, name, domains):
    run = root / name
    run.mkdir()
    record = {"step": 0, "args": {"dataset": "DigitStyles", "algorithm": "ERM", "test_envs": [0], "hparams_seed": 0,
                                  "trial_seed": 0, "output_dir": str(run)}, "hparams": {}}
    record.update({f"env{i}_{s}_acc": 0.5 for i in range(4) for s in ("in", "out")})
    (run / runfiles.RESULTS).write_text(json.dumps(record) + "\n")
    (run / runfiles.SPLITS).write_text(json.dumps({f"env{i}": {"domain": d, "in": [], "out": []}
                                                   for i, d in enumerate(domains)}))
    (run / runfiles.DONE).write_text("done\n")


def test_the_collector_keeps_two_versions_apart(tmp_path):
    _run(tmp_path, "a-old", ["plain", "inverted", "painted", "sketch"])
    _run(tmp_path, "b-new", ["poster", "crayon", "stencil", "chalk"])
    coll = load_records(tmp_path)
    assert sorted(coll.records["dataset"].unique()) == ["DigitStyles", "DigitStyles (poster, crayon, stencil, chalk)"]


def test_runs_of_two_versions_are_not_called_repeats(tmp_path):
    # same dataset name, algorithm, test env and seeds, but another version's domains: not a repeated run
    _run(tmp_path, "a-old", ["plain", "inverted", "painted", "sketch"])
    _run(tmp_path, "b-new", ["poster", "crayon", "stencil", "chalk"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coll = load_records(tmp_path)
    assert coll.duplicate_runs == 0
    assert not [w for w in caught if "repeat" in str(w.message)]
    # a real repeat of the new version is still reported
    _run(tmp_path, "c-new", ["poster", "crayon", "stencil", "chalk"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_records(tmp_path).duplicate_runs == 1
    assert [w for w in caught if "1 run dir(s) repeat" in str(w.message)]
