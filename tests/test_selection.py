"""Model selection on hand-made records whose right answer is worked out by hand (DESIGN.md section 3)."""

import itertools
import random
import time

import numpy as np
import pandas as pd
import pytest

from domainfusion_bench.collect import records_to_frame
from domainfusion_bench.selection import METHODS, select, select_all
from results_factory import record


def R(test_envs, hp, trial, step, **accs):
    return record("D", "ERM", test_envs, hp, trial, step, **accs)


def pick(out, method, test_env=0, trial=0, dataset="D", algorithm="ERM"):
    row = out[(out.selection == method) & (out.test_env == test_env) & (out.trial_seed == trial)
              & (out.dataset == dataset) & (out.algorithm == algorithm)]
    assert len(row) == 1, row
    return row.iloc[0]


# three domains; test env 0 -> training domains 1 and 2
IID_RECORDS = [
    # hparams_seed 0: step 1 has the best mean train-domain out-acc (0.8); its test value is 0.7
    R([0], 0, 0, 0, env0_in_acc=0.5, env0_out_acc=0.4, env1_out_acc=0.6, env2_out_acc=0.6),
    R([0], 0, 0, 1, env0_in_acc=0.7, env0_out_acc=0.9, env1_out_acc=0.7, env2_out_acc=0.9),
    # hparams_seed 1: step 0 is its best (0.8) -> ties hparams_seed 0 at 0.8; the higher seed (1) wins: 0.6
    R([0], 1, 0, 0, env0_in_acc=0.6, env0_out_acc=0.4, env1_out_acc=0.8, env2_out_acc=0.8),
    R([0], 1, 0, 1, env0_in_acc=0.9, env0_out_acc=0.5, env1_out_acc=0.7, env2_out_acc=0.7),
]


def test_iid_best_checkpoint_then_best_hparams_ties_to_higher_seed():
    row = pick(select(IID_RECORDS, "iid"), "iid")
    assert row.hparams_seed == 1 and row.step == 0
    assert row.val_acc == pytest.approx(0.8)
    assert row.test_acc == pytest.approx(0.6)


def test_iid_ignores_test_domain_out_acc_and_prefers_clear_winner():
    recs = [
        # the test domain's out-acc (env0_out) is huge at step 0 but must not count
        R([0], 0, 0, 0, env0_in_acc=0.2, env0_out_acc=1.0, env1_out_acc=0.5, env2_out_acc=0.5),
        R([0], 0, 0, 1, env0_in_acc=0.8, env0_out_acc=0.0, env1_out_acc=0.6, env2_out_acc=0.7),
        R([0], 3, 0, 0, env0_in_acc=0.9, env0_out_acc=0.9, env1_out_acc=0.6, env2_out_acc=0.6),
    ]
    row = pick(select(recs, "iid"), "iid")
    assert (row.hparams_seed, row.step, row.test_acc) == (0, 1, pytest.approx(0.8))
    assert row.val_acc == pytest.approx(0.65)


def test_iid_checkpoint_tie_keeps_the_earlier_step():
    recs = [R([0], 0, 0, s, env0_in_acc=0.1 * (s + 1), env1_out_acc=0.5, env2_out_acc=0.5) for s in range(3)]
    row = pick(select(recs, "iid"), "iid")
    assert row.step == 0 and row.test_acc == pytest.approx(0.1)


def test_oracle_uses_last_checkpoint_and_test_out_acc():
    recs = [
        # hparams 0: an early checkpoint has a better test out-acc, but oracle looks only at the last one
        R([0], 0, 0, 0, env0_in_acc=0.95, env0_out_acc=0.99, env1_out_acc=0.1, env2_out_acc=0.1),
        R([0], 0, 0, 5, env0_in_acc=0.70, env0_out_acc=0.60, env1_out_acc=0.9, env2_out_acc=0.9),
        # hparams 1: last checkpoint test out-acc 0.65 beats 0.60 -> chosen, test value 0.5
        R([0], 1, 0, 0, env0_in_acc=0.10, env0_out_acc=0.10, env1_out_acc=0.9, env2_out_acc=0.9),
        R([0], 1, 0, 5, env0_in_acc=0.50, env0_out_acc=0.65, env1_out_acc=0.2, env2_out_acc=0.2),
    ]
    row = pick(select(recs, "oracle"), "oracle")
    assert (row.hparams_seed, row.step) == (1, 5)
    assert row.val_acc == pytest.approx(0.65) and row.test_acc == pytest.approx(0.5)
    # a tie on the last checkpoint's test out-acc goes to the higher hparams_seed
    tie = recs + [R([0], 2, 0, 5, env0_in_acc=0.3, env0_out_acc=0.65)]
    row = pick(select(tie, "oracle"), "oracle")
    assert row.hparams_seed == 2 and row.test_acc == pytest.approx(0.3)


def loo_records():
    """Three domains, test env 0, one hparams_seed, trial 0.

    run [0]: steps 0, 1, 2 with test values 0.30, 0.40, 0.50
    pair [0,1]: env1_in at steps 0, 1, 2 = 0.6, 0.9, 0.7
    pair [0,2]: env2_in at steps 0, 2 only = 0.6, 0.9 (step 1 missing -> step 1 is dropped)
    validation: step 0 = (0.6+0.6)/2 = 0.6; step 2 = (0.7+0.9)/2 = 0.8 -> step 2, test 0.5.
    (Step 1 would have been the best by pair [0,1] alone: it must not be picked.)
    """
    recs = [R([0], 0, 0, s, env0_in_acc=a, env0_out_acc=0.1, env1_out_acc=0.1, env2_out_acc=0.1)
            for s, a in zip(range(3), (0.3, 0.4, 0.5))]
    recs += [R([0, 1], 0, 0, s, env0_in_acc=0.0, env1_in_acc=a, env0_out_acc=0.0, env1_out_acc=0.0, env2_out_acc=0.0)
             for s, a in zip(range(3), (0.6, 0.9, 0.7))]
    recs += [R([0, 2], 0, 0, s, env0_in_acc=0.0, env2_in_acc=a, env0_out_acc=0.0, env1_out_acc=0.0, env2_out_acc=0.0)
             for s, a in zip((0, 2), (0.6, 0.9))]
    return recs


def test_loo_averages_pair_runs_and_drops_steps_missing_a_pair():
    row = pick(select(loo_records(), "loo"), "loo")
    assert (row.hparams_seed, row.step) == (0, 2)
    assert row.val_acc == pytest.approx(0.8) and row.test_acc == pytest.approx(0.5)


def test_loo_pair_record_belongs_to_both_test_envs():
    """Pair [1,2] validates test env 1 (with env2's in-acc) and test env 2 (with env1's in-acc)."""
    recs = [
        R([1], 0, 0, 0, env1_in_acc=0.11, env0_out_acc=0.5, env1_out_acc=0.5, env2_out_acc=0.5),
        R([2], 0, 0, 0, env2_in_acc=0.22, env0_out_acc=0.5, env1_out_acc=0.5, env2_out_acc=0.5),
        R([0, 1], 0, 0, 0, env0_in_acc=0.40, env1_in_acc=0.9),
        R([0, 2], 0, 0, 0, env0_in_acc=0.60, env2_in_acc=0.9),
        R([1, 2], 0, 0, 0, env1_in_acc=0.70, env2_in_acc=0.80),
    ]
    out = select(recs, "loo")
    one, two = pick(out, "loo", test_env=1), pick(out, "loo", test_env=2)
    assert one.val_acc == pytest.approx((0.40 + 0.80) / 2) and one.test_acc == pytest.approx(0.11)
    assert two.val_acc == pytest.approx((0.60 + 0.70) / 2) and two.test_acc == pytest.approx(0.22)
    zero = pick(out, "loo", test_env=0)
    assert np.isnan(zero.test_acc) and "no single-test-env run" in zero.reason


def test_loo_reason_names_missing_pair_runs():
    recs = [r for r in loo_records() if r["args"]["test_envs"] != [0, 2]]
    row = pick(select(recs, "loo"), "loo")
    assert np.isnan(row.test_acc)
    assert "missing pair runs [0, 2]" in row.reason and "hparams_seed 0" in row.reason
    # and iid/oracle still have a value from run [0]
    assert not np.isnan(pick(select(recs, "iid"), "iid").test_acc)


def test_loo_reason_when_sweep_has_no_pairs():
    recs = [r for r in loo_records() if len(r["args"]["test_envs"]) == 1]
    row = pick(select(recs, "loo"), "loo")
    assert "no pair runs" in row.reason


def test_reasons_for_missing_runs_and_missing_keys():
    recs = [
        R([0], 0, 0, 0, env0_in_acc=0.5, env0_out_acc=0.5, env1_out_acc=0.5, env2_out_acc=0.5),
        # test env 1: the record lacks env2_out_acc, a training domain's validation accuracy
        R([1], 0, 0, 0, env1_in_acc=0.5, env1_out_acc=0.5, env0_out_acc=0.5),
    ]
    out = select(recs, "iid")
    assert not np.isnan(pick(out, "iid", 0).test_acc)
    assert "lack env{i}_out_acc" in pick(out, "iid", 1).reason
    assert "no run holds out env 2" in pick(out, "iid", 2).reason


def test_every_group_of_the_table_is_in_the_output():
    """dataset x its algorithms x its domains x its trial seeds, even without any record."""
    recs = [record("D", "ERM", [0], 0, 0, 0, env0_in_acc=0.5, env1_out_acc=0.5),
            record("D", "Other", [1], 0, 1, 0, env1_in_acc=0.5, env0_out_acc=0.5)]
    out = select(recs, "iid")
    assert len(out) == 2 * 2 * 2
    assert out["test_acc"].notna().sum() == 2
    assert set(out.columns) >= {"selection", "dataset", "algorithm", "test_env", "trial_seed", "hparams_seed",
                                "step", "val_acc", "test_acc", "reason"}


# ---------------------------------------------------------------------------------------------------
# against a plain-Python reading of DomainBed's rules, on random sweeps


def _reference(records, method):
    """DomainBed's selection, record by record (no ties in random data)."""
    groups = {}
    for r in records:
        a = r["args"]
        for t in a["test_envs"]:
            groups.setdefault((a["dataset"], a["algorithm"], t, a["trial_seed"]), []).append(r)
    n_envs = 1 + max(int(k[3:-8]) for r in records for k in r if k.endswith("_out_acc"))
    result = {}
    for (d, alg, t, trial), recs in groups.items():
        best = None
        for hp in sorted({r["args"]["hparams_seed"] for r in recs}):
            run = [r for r in recs if r["args"]["hparams_seed"] == hp]
            singles = sorted((r for r in run if len(r["args"]["test_envs"]) == 1), key=lambda r: r["step"])
            cands = []
            if method == "iid":
                for r in singles:
                    val = np.mean([r[f"env{i}_out_acc"] for i in range(n_envs) if i != t])
                    cands.append((val, r[f"env{t}_in_acc"]))
            elif method == "oracle" and singles:
                cands.append((singles[-1][f"env{t}_out_acc"], singles[-1][f"env{t}_in_acc"]))
            elif method == "loo":
                for r in singles:
                    vals = []
                    for v in range(n_envs):
                        if v == t:
                            continue
                        pair = [p for p in run if sorted(p["args"]["test_envs"]) == sorted([t, v])
                                and p["step"] == r["step"]]
                        if pair:
                            vals.append(pair[0][f"env{v}_in_acc"])
                    if len(vals) == n_envs - 1:
                        cands.append((np.mean(vals), r[f"env{t}_in_acc"]))
            if cands:
                run_best = max(cands, key=lambda c: c[0])
                if best is None or run_best[0] >= best[0]:
                    best = run_best
        if best is not None:
            result[(d, alg, t, trial)] = best[1]
    return result


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_on_random_sweeps(seed):
    rng = random.Random(seed)
    n, recs = 3, []
    tests = [[t] for t in range(n)] + [list(p) for p in itertools.combinations(range(n), 2)]
    for alg, trial, hp, te in itertools.product(["ERM", "X"], range(2), range(3), tests):
        if rng.random() < 0.15:
            continue  # a missing run
        steps = [s for s in range(4) if rng.random() < 0.85] or [0]
        for s in steps:
            accs = {f"env{i}_out_acc": rng.random() for i in range(n)}
            accs.update({f"env{i}_in_acc": rng.random() for i in range(n)})
            recs.append(record("D", alg, te, hp, trial, s, **accs))
    out = select_all(recs)
    for method in METHODS:
        ref = _reference(recs, method)
        got = out[(out.selection == method) & out.test_acc.notna()]
        got = {(r.dataset, r.algorithm, r.test_env, r.trial_seed): r.test_acc for r in got.itertuples()}
        assert got.keys() == ref.keys(), method
        for key in ref:
            assert got[key] == pytest.approx(ref[key]), (method, key)


def test_frame_and_dict_inputs_agree():
    frame, bad = records_to_frame(loo_records())
    assert bad == 0
    pd.testing.assert_frame_equal(select_all(frame), select_all(loo_records()))


def test_select_all_is_fast_on_100k_records():
    """Vectorised: 100,800 records (2 datasets x 5 algorithms x 21 test-env sets x 20 hparams x 3 trials x 8 steps)."""
    rng = np.random.default_rng(0)
    n = 6
    tests = [(t, -1, 1) for t in range(n)] + [(a, b, 2) for a, b in itertools.combinations(range(n), 2)]
    keys = [(d, alg, t, t2, nt, hp, tr) for d in ("A", "B") for alg in ("ERM", "M1", "M2", "M3", "M4")
            for (t, t2, nt) in tests for hp in range(20) for tr in range(3)]
    steps = np.arange(8) * 300
    df = pd.DataFrame(keys, columns=["dataset", "algorithm", "test_env", "test_env2", "n_test_envs", "hparams_seed",
                                     "trial_seed"]).loc[np.repeat(np.arange(len(keys)), len(steps))].reset_index(drop=True)
    df["step"] = np.tile(steps, len(keys))
    df["run"] = np.repeat(np.arange(len(keys)), len(steps)).astype(str)
    for i in range(n):
        df[f"env{i}_in_acc"] = rng.random(len(df))
        df[f"env{i}_out_acc"] = rng.random(len(df))
    assert len(df) >= 100_000
    start = time.perf_counter()
    out = select_all(df)
    elapsed = time.perf_counter() - start
    assert len(out) == 3 * 2 * 5 * n * 3 and out.test_acc.notna().all()
    assert elapsed < 20, f"selection took {elapsed:.1f}s on {len(df)} records"
