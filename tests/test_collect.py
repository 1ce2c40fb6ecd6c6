"""The collector: run dirs (dfbench's and DomainBed's, unchanged) -> one records frame, never crashing."""

import json

import numpy as np
import pytest

from domainfusion_bench.collect import CollectWarning, load_records, records_to_frame
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.selection import select
from results_factory import domainbed_args, make_sweep, record, write_run


def two_records(test_envs=(0,), hp=0, trial=0):
    return [record("D", "ERM", list(test_envs), hp, trial, s, env0_in_acc=0.5 + 0.1 * s, env0_out_acc=0.5,
                   env1_out_acc=0.6 + 0.1 * s) for s in (0, 1)]


def test_reads_records_into_a_frame(tmp_path):
    write_run(tmp_path, "a", two_records(), domains=["left", "right"])
    coll = load_records(tmp_path)
    assert coll.runs == 1 and len(coll.records) == 2 and coll.skipped_lines == 0
    df = coll.records
    assert df["step"].tolist() == [0, 1]
    assert df["run"].unique().tolist() == ["a"]
    assert df[["dataset", "algorithm", "test_env", "test_env2", "n_test_envs"]].iloc[0].tolist() == ["D", "ERM", 0, -1, 1]
    assert "env1_in_acc" not in df.columns  # no record has it
    assert coll.domains == {"D": ["left", "right"]}


def test_truncated_last_line_and_non_json_line_are_skipped_with_a_count(tmp_path):
    run = write_run(tmp_path, "a", two_records())
    good = (run / "results.jsonl").read_text().splitlines()
    text = good[0] + "\nthis is not json\n" + good[1] + "\n" + good[1][: len(good[1]) // 2]  # torn write at the end
    (run / "results.jsonl").write_text(text)
    with pytest.warns(CollectWarning, match=r"skipped 2 unreadable line"):
        coll = load_records(tmp_path)
    assert coll.skipped_lines == 2 and coll.skipped_by_file == {"a": 2}
    assert len(coll.records) == 2
    assert "skipped lines: 2" in coll.summary()


def test_runs_without_done_are_ignored_unless_include_incomplete(tmp_path):
    write_run(tmp_path, "done_run", two_records(hp=0))
    write_run(tmp_path, "running", two_records(hp=1), done=False)
    coll = load_records(tmp_path)
    assert coll.runs == 1 and coll.incomplete_runs == ["running"]
    assert coll.records["hparams_seed"].unique().tolist() == [0]
    coll = load_records(tmp_path, include_incomplete=True)
    assert coll.runs == 2 and coll.included_incomplete == ["running"]
    assert sorted(coll.records["hparams_seed"].unique().tolist()) == [0, 1]


def test_only_incomplete_runs_warns_how_to_include_them(tmp_path):
    write_run(tmp_path, "running", two_records(), done=False)
    with pytest.warns(CollectWarning, match="include-incomplete"):
        coll = load_records(tmp_path)
    assert coll.runs == 0 and coll.records.empty


def test_reads_a_domainbed_run_dir_unchanged(tmp_path):
    """A run dir as DomainBed's train.py leaves it: results.jsonl with every env's in/out acc, its args, done."""
    root = tmp_path / "domainbed_sweep"
    for hp, (val, test) in enumerate([(0.70, 0.61), (0.80, 0.52)]):
        out_dir = root / f"{hp:032x}"
        recs = []
        for step in (0, 300):
            rec = {"args": domainbed_args("PACS", "ERM", [3], hp, 0, str(out_dir)),
                   "epoch": step / 100, "hparams": {"batch_size": 32, "class_balanced": False, "data_augmentation": True,
                                                    "lr": 5e-05, "nonlinear_classifier": False, "resnet18": False,
                                                    "resnet_dropout": 0.0, "weight_decay": 0.0},
                   "loss": 1.0, "mem_gb": 4.2, "step": step, "step_time": 0.3}
            for i in range(4):
                rec[f"env{i}_in_acc"] = test if i == 3 and step == 300 else 0.1
                rec[f"env{i}_out_acc"] = val if i != 3 and step == 300 else 0.2
            recs.append(rec)
        run = write_run(root, out_dir.name, recs)
        (run / "out.txt").write_text("Environment:\n\tPython: 3.8\n")
        (run / "err.txt").write_text("")
        (run / "model.pkl").write_bytes(b"\x80\x04not a real pickle")
    coll = load_records(root)
    assert coll.runs == 2 and len(coll.records) == 4
    assert coll.domains == {"PACS": ["A", "C", "P", "S"]}  # DomainBed's own labels
    row = select(coll.records, "iid", coll.n_envs)
    row = row[(row.test_env == 3)].iloc[0]
    assert (row.hparams_seed, row.step, row.test_acc) == (1, 300, pytest.approx(0.52))


def test_a_domainbed_sweep_of_many_runs(tmp_path):
    make_sweep(tmp_path, {"VLCS": ["C", "L", "S", "V"]}, ["ERM", "CORAL"], n_trials=2, n_hparams=2, style="domainbed")
    coll = load_records(tmp_path)
    assert coll.runs == 2 * 10 * 2 * 2
    out = select(coll.records, "loo", coll.n_envs)
    assert out.test_acc.notna().all()


def test_corrupted_results_never_crash_collect(tmp_path):
    write_run(tmp_path, "good", two_records())
    bad = {
        "binary": b"\x00\xff\xfe garbage \x80\n",
        "empty": b"",
        "array": b"[1, 2, 3]\n",
        "no_args": json.dumps({"step": 0, "env0_in_acc": 0.5}).encode() + b"\n",
        "bad_types": json.dumps({"step": "x", "args": {"dataset": "D", "algorithm": "ERM", "test_envs": "0",
                                                       "hparams_seed": 0, "trial_seed": 0}}).encode() + b"\n",
        "null_acc": json.dumps({**two_records()[0], "env0_in_acc": None}).encode() + b"\n",
        "nested_garbage": b'{"args": {"dataset": ["D"]}, "step": 0}\n{"a":\n',
    }
    for name, content in bad.items():
        run = tmp_path / name
        run.mkdir()
        (run / "results.jsonl").write_bytes(content)
        (run / "done").write_text("done\n")
    (tmp_path / "dir_named_results" / "results.jsonl").mkdir(parents=True)
    with pytest.warns(CollectWarning):
        coll = load_records(tmp_path)
    assert len(coll.records[coll.records.run == "good"]) == 2
    assert coll.skipped_lines >= 6
    # the record with a null accuracy is kept, without that key's value
    null = coll.records[coll.records.run == "null_acc"]
    assert len(null) == 1 and np.isnan(null["env0_in_acc"].iloc[0])


def test_duplicate_run_keys_are_pooled_with_a_warning(tmp_path):
    write_run(tmp_path, "first", two_records())
    write_run(tmp_path, "again", two_records())
    with pytest.warns(CollectWarning, match="pooled"):
        coll = load_records(tmp_path)
    assert coll.duplicate_runs == 1 and len(coll.records) == 4


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(DfbenchError, match="does not exist"):
        load_records(tmp_path / "nope")


def test_one_run_dir_as_root(tmp_path):
    run = write_run(tmp_path, "solo", two_records())
    coll = load_records(run)
    assert coll.runs == 1 and coll.records["run"].tolist() == [".", "."]


def test_records_to_frame_counts_unusable_records():
    frame, bad = records_to_frame([*two_records(), {"step": 1}, "text", record("D", "ERM", [], 0, 0, 0)])
    assert bad == 3 and len(frame) == 2


def test_cost_keys_are_kept(tmp_path):
    make_sweep(tmp_path, {"D": ["a", "b"]}, ["ERM", "Gen"], n_trials=1, n_hparams=1, pairs=False)
    df = load_records(tmp_path).records
    for col in ("wall_time", "images_per_s", "mem_gb", "cost_generated_images", "cost_nfes", "cost_generation_seconds"):
        assert col in df.columns
    assert df[df.algorithm == "ERM"]["cost_generated_images"].isna().all()


def test_damaged_seeds_and_binary_files_never_crash_collection(tmp_path):
    from domainfusion_bench import runfiles
    from domainfusion_bench.frames.values import _as_int

    assert [_as_int(v) for v in ["--1", "\u00b2", " 7 ", "-3", "3.5", True]] == [None, None, 7, -3, None, None]
    path = tmp_path / "splits.json"
    path.write_bytes(b"\xff\xfe\x00binary")
    assert runfiles.read_json(path) is None


def _reference_row(rec):
    """One record -> its frame row, the rule written out record by record (what the columnar loader must equal)."""
    from domainfusion_bench.frames.values import _args_row, _as_float, _as_int, _keep

    if not isinstance(rec, dict):
        return None
    base, step = _args_row(rec.get("args")), _as_int(rec.get("step"))
    if base is None or step is None:
        return None
    row = {**base, "step": step}
    row.update({k: _as_float(v) for k, v in rec.items() if _keep(k) and _as_float(v) is not None})
    if rec.get("diverged_at") is not None:
        row["diverged"] = 1.0
    return row


@pytest.mark.parametrize("chunk", [5, 1 << 20])
def test_columnar_loading_equals_the_record_by_record_rule(monkeypatch, chunk):
    import pandas as pd

    from domainfusion_bench.frames import build as collect_frame

    monkeypatch.setattr(collect_frame._Pending, "LIMIT", chunk)  # values become matrices every few records, or at the end
    rng = np.random.default_rng(0)
    odd = [True, "0.5", None, [1], float("nan"), 3]
    recs, runs = [], []
    for r in range(40):
        args = {"dataset": "D", "algorithm": ["ERM", "X"][r % 2], "test_envs": [[0], [1], [0, 1], []][r % 4],
                "hparams_seed": [0, 1, "2", None][r % 4 if r % 7 else 3], "trial_seed": r % 3}
        if r % 5 == 0:
            args["hparams"] = {"lr": [0.1, 0.2][r % 2]}
        for k in range(int(rng.integers(1, 5))):
            if rng.random() < 0.15:  # args change within a run
                args = {**args, "trial_seed": int(rng.integers(3))}
            rec = {"step": [10 * k, 10 * k, str(k), 2.0, None, True][int(rng.integers(6))], "args": args, "loss": 0.3}
            for key in ("env0_in_acc", "env0_out_acc", "env1_in_acc", "wall_time", "cost_nfe", "metric_x", "mem_gb"):
                if rng.random() < 0.8:
                    rec[key] = float(rng.random()) if rng.random() < 0.8 else odd[int(rng.integers(len(odd)))]
            if rng.random() < 0.1:
                rec["diverged_at"] = 3
            recs.append(rec if rng.random() > 0.05 else "not a record")
            runs.append(f"run{r}")
    recs.append({"step": 0, "args": {**args, "test_envs": [0]}, "metric_only_text": "high"})  # never a number
    runs.append("last")
    frame, bad = records_to_frame(recs, run=runs)
    rows = [(_reference_row(rec), run) for rec, run in zip(recs, runs)]
    expected = collect_frame._frame(pd.DataFrame([{**row, "run": run} for row, run in rows if row is not None]).to_dict("list"))
    assert bad == sum(row is None for row, _ in rows) and bad > 5
    assert "metric_only_text" not in frame and frame["env0_in_acc"].isna().any()
    pd.testing.assert_frame_equal(frame, expected, check_exact=True)


def test_reading_with_worker_processes_gives_the_same_collection(tmp_path):
    import pandas as pd

    make_sweep(tmp_path, {"D": ["a", "b", "c"]}, ["ERM", "Gen"], n_trials=2, n_hparams=2, pairs=True)
    write_run(tmp_path, "zz-broken", two_records(trial=7), done=True)
    (tmp_path / "zz-broken" / "results.jsonl").write_bytes(b'{"step": 0, "ar')  # half-written, no record left
    one = load_records(tmp_path, workers=1, warn=False)
    for n in (2, 3):
        many = load_records(tmp_path, workers=n, warn=False)
        pd.testing.assert_frame_equal(many.records, one.records, check_exact=True)
        assert (many.runs, many.skipped_by_file, many.domains, many.duplicate_runs) == \
            (one.runs, one.skipped_by_file, one.domains, one.duplicate_runs)
    assert one.runs > 10 and one.skipped_by_file == {"zz-broken": 1}


def test_records_from_before_the_judge_was_renamed_are_read_under_its_new_name(tmp_path):
    old = [record("D", "CDGA", [0], 0, 0, 0, env0_out_acc=0.5, metric_oracle_val_acc=0.9, cost_og_oracle_seconds=2.0)]
    new = [record("D", "CDGA", [0], 0, 1, 0, env0_out_acc=0.5, metric_judge_val_acc=0.8, cost_og_judge_seconds=3.0)]
    write_run(tmp_path, "old", old)
    write_run(tmp_path, "new", new)
    df = load_records(tmp_path).records.sort_values("trial_seed")
    assert df["metric_judge_val_acc"].tolist() == [0.9, 0.8] and df["cost_og_judge_seconds"].tolist() == [2.0, 3.0]
    assert not [c for c in df.columns if "oracle" in c]
