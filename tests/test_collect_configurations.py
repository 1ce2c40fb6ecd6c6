"""Numbers that cannot be silently wrong (issue #21): a stale run never enters a table, and a table row
pools only runs whose configurations match apart from seeds."""

import pytest

from domainfusion_bench.collect import CollectWarning, load_records
from domainfusion_bench.selection import select
from results_factory import domainbed_args, record, write_dfbench_run, write_run


def accs(test: float, val: float = 0.5) -> dict[str, float]:
    return {"env0_in_acc": test, "env0_out_acc": val, **{f"env{i}_out_acc": val for i in range(1, 6)}}


def test_a_stale_run_is_left_out_with_a_note_naming_it_and_what_differs(tmp_path):
    write_dfbench_run(tmp_path, "t0", [accs(0.177)], trial_seed=0)
    write_dfbench_run(tmp_path, "t1", [accs(0.177)], trial_seed=1)
    # same arguments, made when a default was another one; and its records say 99%
    write_dfbench_run(tmp_path, "t1_old", [accs(0.99, val=0.9)], trial_seed=1,
                      fingerprint_edit={"hparams_resolved": {"cnn_width": 7}})
    with pytest.warns(CollectWarning, match=r"left out 1 stale run.*t1_old.*hparams_resolved\.cnn_width: 7 in "
                                            r"fingerprint\.json, 32 now"):
        coll = load_records(tmp_path)
    assert list(coll.stale_runs) == ["t1_old"] and coll.runs == 2
    assert "t1_old" not in set(coll.records["run"]) and "stale runs (left out): 1" in coll.summary()
    for method in ("iid", "oracle"):
        rows = select(coll.records, method).query("test_env == 0")
        assert rows["test_acc"].tolist() == [0.177, 0.177]


def test_a_run_made_under_older_defaults_is_stale(tmp_path):
    write_dfbench_run(tmp_path, "old", [accs(0.99)], older_hparams={"cnn_width": 7})  # records and fingerprint agree
    with pytest.warns(CollectWarning, match=r"old: .*cnn_width: 7 in fingerprint\.json, 32 now"):
        coll = load_records(tmp_path)
    assert coll.records.empty and list(coll.stale_runs) == ["old"]


def test_records_that_do_not_match_their_fingerprint_are_stale(tmp_path):
    write_dfbench_run(tmp_path, "edited", [accs(0.99)], fingerprint_edit={"holdout_fraction": 0.5})
    with pytest.warns(CollectWarning, match=r"edited: .*holdout_fraction: 0\.5 in fingerprint\.json, 0\.2 now"):
        coll = load_records(tmp_path)
    assert coll.records.empty and coll.runs == 0


@pytest.mark.parametrize("change, label", [
    ({"holdout_fraction": 0.5}, "holdout_fraction=0.5"),
    ({"steps": 300}, "steps=300"),
    ({"eval_augment": True}, "eval_augment=True"),
    ({"eval_splits": "all"}, "eval_splits=all"),
    ({"protocol": {"precision": "bf16"}}, "precision=bf16"),  # precision=auto ran as bf16 on a GPU
    ({"protocol": {"image_store": {"used": True}}}, "image_store={'used': True}"),
])
def test_runs_of_different_protocols_are_rows_of_their_own(tmp_path, change, label):
    base = {"holdout_fraction": 0.2, "steps": None, "eval_augment": False, "eval_splits": "needed"}
    for trial in (0, 1):
        write_dfbench_run(tmp_path, f"a{trial}", [accs(0.2), accs(0.3, val=0.6)], trial_seed=trial)
        write_dfbench_run(tmp_path, f"b{trial}", [accs(0.9, val=0.7)], trial_seed=trial, **change)
    coll = load_records(tmp_path)
    assert coll.stale_runs == {} and coll.duplicate_runs == 0
    algorithms = sorted(coll.records["algorithm"].unique())
    other = label.split("=")[0]
    base["image_store"] = {"used": False}
    assert algorithms == sorted([f"ERM [{other}={base.get(other, 'fp32')}]", f"ERM [{label}]"])
    for method in ("iid", "oracle"):
        rows = select(coll.records, method).query("test_env == 0")
        by_row = rows.groupby("algorithm")["test_acc"].apply(list).to_dict()
        assert by_row == {f"ERM [{other}={base.get(other, 'fp32')}]": [0.3, 0.3], f"ERM [{label}]": [0.9, 0.9]}


def test_speed_settings_and_reasons_do_not_split_a_row(tmp_path):
    store = {"image_store": {"used": False, "why": "Speed"}}
    write_dfbench_run(tmp_path, "a", [accs(0.2)], protocol={"cudnn_benchmark": True, **store})
    write_dfbench_run(tmp_path, "b", [accs(0.2)], trial_seed=1, protocol={"image_store": {"used": False, "why": "big"}})
    assert load_records(tmp_path).records["algorithm"].unique().tolist() == ["ERM"]


def test_a_random_search_stays_one_row_and_grid_points_stay_rows_of_their_own(tmp_path):
    for hp in (0, 1, 2):  # the draws differ in every resolved value: selection chooses among them
        write_dfbench_run(tmp_path, f"h{hp}", [accs(0.1 * hp + 0.1, val=0.1 * hp + 0.1)], hparams_seed=hp)
    coll = load_records(tmp_path)
    assert coll.records["algorithm"].unique().tolist() == ["ERM"]
    assert select(coll.records, "iid").query("test_env == 0")["hparams_seed"].tolist() == [2]
    for lr in (0.001, 0.01):
        write_dfbench_run(tmp_path, f"lr{lr}", [accs(0.5)], hparams=f'{{"lr": {lr}}}', hparams_seed=1)
    names = set(load_records(tmp_path).records["algorithm"])
    assert {"ERM [lr=0.001]", "ERM [lr=0.01]"} <= names


def test_domainbed_run_dirs_keep_domainbeds_pooling(tmp_path):
    for name, holdout in (("a", 0.2), ("b", 0.5)):
        args = {**domainbed_args("PACS", "ERM", [0], 0, 0, str(tmp_path / name)), "holdout_fraction": holdout}
        rec = {**record("PACS", "ERM", [0], 0, 0, 0, env0_in_acc=0.5, env1_out_acc=0.5), "args": args}
        write_run(tmp_path, name, [rec])
    with pytest.warns(CollectWarning, match="pooled"):
        coll = load_records(tmp_path)
    assert coll.records["algorithm"].unique().tolist() == ["ERM"] and coll.stale_runs == {}
