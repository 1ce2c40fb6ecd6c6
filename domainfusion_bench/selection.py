"""Model selection exactly as DESIGN.md section 3 (DomainBed's three methods), on a pandas frame.

Pure: a records frame in (``frames.records_to_frame`` / ``collect.load_records``), one row per group
out. A group is (dataset, algorithm, test_env, trial_seed); a record with test envs [t, v] belongs to
the groups of t and of v.

- ``iid`` (training-domain validation): for each hparams_seed, the checkpoint of the single-test-env
  run [t] with the highest mean out-accuracy over the training domains; then the hparams_seed with the
  highest such value. Test value: env t's in-accuracy at that checkpoint.
- ``loo`` (leave-one-domain-out): at each step of run [t], validation = mean over every other domain v
  of env v's in-accuracy in pair run [t, v] at that step; steps missing any pair run are dropped. Then
  the best step, then the best hparams_seed.
- ``oracle``: the last checkpoint of run [t] only; validation = env t's out-accuracy.

Ties between hparams_seeds go to the higher hparams_seed. Ties between checkpoints of one run go to the
earlier step (DomainBed's ``argmax`` keeps the first maximum). When a group has no value, ``reason``
says which runs or keys are missing.

Everything on records is vectorised (numpy / pandas); Python loops run only over groups that failed,
to word their reason.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from domainfusion_bench.frames import infer_n_envs, records_to_frame

METHODS = {
    "iid": "training-domain validation set",
    "loo": "leave-one-domain-out cross-validation",
    "oracle": "test-domain validation set (oracle)",
}
GROUP = ["dataset", "algorithm", "test_env", "trial_seed"]
RUN = GROUP + ["hparams_seed"]
OUTPUT_COLUMNS = ["selection", *GROUP, "hparams_seed", "step", "val_acc", "test_acc", "reason"]
_ACC = re.compile(r"^env(\d+)_(in|out)_acc$")


def _frame(records: Any) -> pd.DataFrame:
    if isinstance(records, pd.DataFrame):
        return records
    return records_to_frame(records)[0]


def _acc_matrices(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(IN, OUT): arrays of shape (records, domains), NaN where a record lacks the key."""
    indices = [int(_ACC.match(c).group(1)) for c in df.columns if _ACC.match(c)]
    width = 1 + max(indices + [int(df["test_env"].max()), int(df["test_env2"].max()), 0])
    mats = {s: np.full((len(df), width), np.nan) for s in ("in", "out")}
    for col in df.columns:
        m = _ACC.match(col)
        if m:
            mats[m.group(2)][:, int(m.group(1))] = df[col].to_numpy(dtype=float)
    return mats["in"], mats["out"]


class _Coded:
    """The frame as selection reads it, built once for all methods: dataset and algorithm as integer codes
    in sorted name order (grouping, sorting and de-duplicating 1.8M strings again and again is most of
    the time on a big sweep), the accuracy matrices, and each record's number of domains."""

    def __init__(self, df: pd.DataFrame, n_envs: Mapping[str, int] | None):
        ds_codes, ds_names = pd.factorize(df["dataset"], sort=True)
        al_codes, al_names = pd.factorize(df["algorithm"], sort=True)
        self.datasets = np.asarray(ds_names, dtype=object)
        self.algorithms = np.asarray(al_names, dtype=object)
        cols = ["trial_seed", "hparams_seed", "test_env", "test_env2", "n_test_envs", "step"]
        self.df = pd.DataFrame({"dataset": ds_codes.astype(np.int64), "algorithm": al_codes.astype(np.int64),
                                **{c: df[c].to_numpy() for c in cols}})
        self.IN, self.OUT = _acc_matrices(df)
        known = dict(infer_n_envs(df))
        for name, n in (n_envs or {}).items():
            known[name] = max(int(n), known.get(name, 0))
        per_dataset = np.array([known[name] for name in self.datasets], dtype=int)
        self.nenv = per_dataset[ds_codes]

    def decode(self, out: pd.DataFrame) -> pd.DataFrame:
        """Names back in the (few) output rows."""
        out["dataset"] = self.datasets[out["dataset"].to_numpy(dtype=np.int64)]
        out["algorithm"] = self.algorithms[out["algorithm"].to_numpy(dtype=np.int64)]
        return out


def _universe(df: pd.DataFrame, n_envs: np.ndarray) -> pd.DataFrame:
    """Every group a table has a cell for: dataset x its algorithms x its domains x its trial seeds."""
    parts = []
    nd = pd.Series(n_envs, index=df.index).groupby(df["dataset"]).max()
    for dataset, sub in df.groupby("dataset", sort=True):
        algs = pd.DataFrame({"algorithm": sorted(sub["algorithm"].unique())})
        envs = pd.DataFrame({"test_env": np.arange(int(nd[dataset]))})
        trials = pd.DataFrame({"trial_seed": np.sort(sub["trial_seed"].unique())})
        u = algs.merge(envs, how="cross").merge(trials, how="cross")
        u.insert(0, "dataset", dataset)
        parts.append(u)
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=object if c in ("dataset", "algorithm") else "int64") for c in GROUP})
    return pd.concat(parts, ignore_index=True)[GROUP]


def _best(cand: pd.DataFrame) -> pd.DataFrame:
    """Per run the best step (ties: earlier), then per group the best hparams_seed (ties: higher)."""
    cand = cand.sort_values(RUN + ["val_acc", "step"], ascending=[True] * len(RUN) + [False, True], kind="mergesort")
    per_run = cand.drop_duplicates(RUN, keep="first")
    per_run = per_run.sort_values(GROUP + ["val_acc", "hparams_seed"], ascending=[True] * len(GROUP) + [False, False],
                                  kind="mergesort")
    return per_run.drop_duplicates(GROUP, keep="first")


def _singles(df: pd.DataFrame, IN: np.ndarray, OUT: np.ndarray, nenv: np.ndarray):
    mask = (df["n_test_envs"] == 1).to_numpy()
    s = df.loc[mask, RUN + ["step"]].copy()
    return s, IN[mask], OUT[mask], nenv[mask]


def _iid(df, IN, OUT, nenv) -> pd.DataFrame:
    s, sin, sout, sn = _singles(df, IN, OUT, nenv)
    t = s["test_env"].to_numpy()
    cols = np.arange(sout.shape[1])
    train = (cols[None, :] < sn[:, None]) & (cols[None, :] != t[:, None])
    count = train.sum(axis=1)
    missing = (train & np.isnan(sout)).any(axis=1) | (count == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        val = np.where(train, np.nan_to_num(sout), 0.0).sum(axis=1) / count
    val[missing] = np.nan
    s["val_acc"] = val
    s["test_acc"] = sin[np.arange(len(s)), t] if len(s) else np.array([])
    return s


def _oracle(df, IN, OUT, nenv) -> pd.DataFrame:
    s, sin, sout, _ = _singles(df, IN, OUT, nenv)
    s["_row"] = np.arange(len(s))
    s = s.sort_values(RUN + ["step"], kind="mergesort").drop_duplicates(RUN, keep="last")
    rows, t = s.pop("_row").to_numpy(), s["test_env"].to_numpy()
    s["val_acc"] = sout[rows, t] if len(s) else np.array([])
    s["test_acc"] = sin[rows, t] if len(s) else np.array([])
    return s


def _pair_rows(df, IN, nenv) -> pd.DataFrame:
    """Each pair-run record [a, b] twice: as validation domain b for test env a, and a for b."""
    mask = ((df["n_test_envs"] == 2) & (df["test_env"] != df["test_env2"])).to_numpy()
    p = df.loc[mask, ["dataset", "algorithm", "trial_seed", "hparams_seed", "step", "test_env", "test_env2"]]
    pin, a, b = IN[mask], p["test_env"].to_numpy(), p["test_env2"].to_numpy()
    rows = np.arange(len(p))
    base = p[["dataset", "algorithm", "trial_seed", "hparams_seed", "step"]]
    first = base.assign(test_env=a, val_env=b, val=pin[rows, b] if len(p) else np.array([]))
    second = base.assign(test_env=b, val_env=a, val=pin[rows, a] if len(p) else np.array([]))
    both = pd.concat([first, second], ignore_index=True)
    return both.assign(n_envs=np.concatenate([nenv[mask], nenv[mask]]))


def _loo(df, IN, OUT, nenv) -> pd.DataFrame:
    s, sin, _, _ = _singles(df, IN, OUT, nenv)
    s["test_acc"] = sin[np.arange(len(s)), s["test_env"].to_numpy()] if len(s) else np.array([])
    s = s.drop_duplicates(RUN + ["step"], keep="last").dropna(subset=["test_acc"])
    pairs = _pair_rows(df, IN, nenv)
    pairs = pairs.drop_duplicates(RUN + ["step", "val_env"], keep="last")
    pairs = pairs[pairs["val"].notna() & (pairs["val_env"] < pairs["n_envs"])]
    agg = pairs.groupby(RUN + ["step"], sort=False).agg(val_acc=("val", "mean"), n_val=("val_env", "size"),
                                                       n_envs=("n_envs", "first")).reset_index()
    agg = agg[agg["n_val"] == agg["n_envs"] - 1]
    out = s.merge(agg[RUN + ["step", "val_acc"]], on=RUN + ["step"], how="inner")
    return out[RUN + ["step", "val_acc", "test_acc"]]


_CANDIDATES = {"iid": _iid, "oracle": _oracle, "loo": _loo}


def ranges(values: Iterable[int]) -> str:
    """0,1,2,5 -> '0-2, 5'."""
    vals, out = sorted(set(int(v) for v in values)), []
    i = 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        out.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return ", ".join(out)


class _Reasons:
    """Words for groups without a value; built only when some group failed."""

    def __init__(self, df: pd.DataFrame, nenv: np.ndarray, cand: pd.DataFrame, method: str):
        self.method = method
        single = df["n_test_envs"] == 1
        self.single_hps = df[single].groupby(GROUP, sort=False)["hparams_seed"].unique().to_dict()
        self.cand_hps = cand.groupby(GROUP, sort=False)["hparams_seed"].unique().to_dict() if len(cand) else {}
        self.n_envs = pd.Series(nenv, index=df.index).groupby(df["dataset"]).max().to_dict()
        pair = (df["n_test_envs"] == 2) & (df["test_env"] != df["test_env2"])
        p = df[pair]
        lo = np.minimum(p["test_env"], p["test_env2"])
        hi = np.maximum(p["test_env"], p["test_env2"])
        keyed = p[["dataset", "algorithm", "trial_seed", "hparams_seed"]].assign(lo=lo, hi=hi).drop_duplicates()
        self.pairs: dict[tuple, set[tuple[int, int]]] = {}
        for key, sub in keyed.groupby(["dataset", "algorithm", "trial_seed", "hparams_seed"], sort=False):
            self.pairs[key] = set(zip(sub["lo"].tolist(), sub["hi"].tolist()))
        self.datasets_with_pairs = set(p["dataset"].unique())
        self.any_run = set(map(tuple, pd.concat([df[GROUP], df[GROUP].assign(test_env=df["test_env2"])])
                               .query("test_env >= 0").drop_duplicates().itertuples(index=False, name=None)))

    def __call__(self, dataset: str, algorithm: str, test_env: int, trial: int) -> str:
        key = (dataset, algorithm, test_env, trial)
        hps = self.single_hps.get(key)
        if hps is None or len(hps) == 0:
            if key in self.any_run:
                return f"no single-test-env run with test_envs [{test_env}] (only pair runs)"
            return f"no run holds out env {test_env} (test_envs [{test_env}])"
        hp_text = f"hparams_seed {ranges(hps)}"
        if self.method == "iid":
            return (f"runs with test_envs [{test_env}] ({hp_text}) lack env{{i}}_out_acc of a training domain "
                    f"or env{test_env}_in_acc")
        if self.method == "oracle":
            return (f"the last checkpoint of runs with test_envs [{test_env}] ({hp_text}) lacks "
                    f"env{test_env}_out_acc or env{test_env}_in_acc")
        if dataset not in self.datasets_with_pairs:
            return "no pair runs (test_envs [t, v]) for this dataset: leave-one-domain-out needs a sweep with pairs"
        n = int(self.n_envs[dataset])
        wanted = {(min(test_env, v), max(test_env, v)) for v in range(n) if v != test_env}
        missing: dict[tuple[int, int], list[int]] = {}
        for hp in hps:
            for pair in wanted - self.pairs.get((dataset, algorithm, trial, hp), set()):
                missing.setdefault(pair, []).append(int(hp))
        if missing and all(len(wanted - self.pairs.get((dataset, algorithm, trial, hp), set())) for hp in hps):
            runs = ", ".join(f"[{a}, {b}]" for a, b in sorted(missing))
            return f"missing pair runs {runs} (for {hp_text})"
        return (f"no checkpoint step where run [{test_env}] and all its pair runs have env{{v}}_in_acc / "
                f"env{test_env}_in_acc ({hp_text})")


def select(records: Any, method: str, n_envs: Mapping[str, int] | None = None) -> pd.DataFrame:
    """One row per group (``OUTPUT_COLUMNS``): the chosen hparams_seed, step, val_acc and test_acc
    (fractions, as in the records), or NaN there and a ``reason``.

    ``records``: a frame from ``collect`` or a list of record dicts. ``n_envs``: domains per dataset
    (default: inferred from the records' keys).
    """
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; choices: {', '.join(METHODS)}")
    df = _frame(records).reset_index(drop=True)
    if df.empty:
        return pd.DataFrame(columns=OUTPUT_COLUMNS)
    return _select(_Coded(df, n_envs), method)


def _select(coded: _Coded, method: str) -> pd.DataFrame:
    df, nenv, IN, OUT = coded.df, coded.nenv, coded.IN, coded.OUT
    cand = _CANDIDATES[method](df, IN, OUT, nenv)
    cand = cand[cand["val_acc"].notna() & cand["test_acc"].notna()]
    chosen = _best(cand)[GROUP + ["hparams_seed", "step", "val_acc", "test_acc"]]
    out = _universe(df, nenv).merge(chosen, on=GROUP, how="left")
    out.insert(0, "selection", method)
    out["reason"] = None
    failed = out["test_acc"].isna()
    if failed.any():
        words = _Reasons(df, nenv, cand, method)
        out.loc[failed, "reason"] = [words(*key) for key in out.loc[failed, GROUP].itertuples(index=False, name=None)]
    out["hparams_seed"] = out["hparams_seed"].astype("Int64")
    out["step"] = out["step"].astype("Int64")
    out = out[OUTPUT_COLUMNS].sort_values(["dataset", "algorithm", "test_env", "trial_seed"], ignore_index=True)
    return coded.decode(out)


def select_all(records: Any, methods: Sequence[str] = tuple(METHODS),
               n_envs: Mapping[str, int] | None = None) -> pd.DataFrame:
    """``select`` for several methods, stacked."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown selection method {m!r}; choices: {', '.join(METHODS)}")
    df = _frame(records).reset_index(drop=True)
    if df.empty or not methods:
        frames = [pd.DataFrame(columns=OUTPUT_COLUMNS) for _ in methods]
    else:
        coded = _Coded(df, n_envs)
        frames = [_select(coded, m) for m in methods]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=OUTPUT_COLUMNS)
