"""Rows that are not DG results (oracle, few-shot target) carry their label in every table, after the DG rows."""

from domainfusion_bench.algorithms import ALGORITHMS
from domainfusion_bench.collect import load_records
from domainfusion_bench.tables import build_leaderboard
from results_factory import record, write_run


def test_oracle_and_few_shot_rows_are_labelled_and_listed_last(tmp_path):
    assert ALGORITHMS.get("TGDP-FS").TRACK == "few-shot target" and ALGORITHMS.get("CDGA*").TRACK == "oracle"
    assert ALGORITHMS.get("TGDP").TRACK == ALGORITHMS.get("CDGA").TRACK == "DG"
    for alg, track in [("TGDP-FS", "few-shot target"), ("ERM", None), ("TGDP", None), ("CDGA*", "oracle")]:
        for trial in range(2):
            recs = [record("DigitStyles", alg, [2], 0, trial, step, env0_out_acc=0.5 + 0.01 * step, env1_out_acc=0.6,
                           env3_out_acc=0.6, env2_in_acc=0.4, env2_out_acc=0.4, env0_in_acc=0.5, env1_in_acc=0.5,
                           env3_in_acc=0.5) for step in (0, 10)]
            for r in recs:
                if track:
                    r["args"]["track"] = track
            write_run(tmp_path, f"{alg}-{trial}", recs, domains=["poster", "crayon", "stencil", "chalk"])
    coll = load_records(tmp_path, warn=False)
    names = list(dict.fromkeys(coll.records["algorithm"]))
    assert sorted(names) == sorted(["TGDP-FS [few-shot target]", "ERM", "TGDP", "CDGA* [oracle]"])
    board = build_leaderboard(coll.records, coll.domains, selections=["iid"])
    rows = board.tables[0].rows
    assert rows == ["ERM", "TGDP", "CDGA* [oracle]", "TGDP-FS [few-shot target]"]
