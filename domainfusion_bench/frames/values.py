"""Record values -> frame values: the checks every record goes through (a usable ``args``, integer seeds,
number keys), kept cheap because a big sweep has millions of records."""

from __future__ import annotations

import json
import re
from numbers import Integral, Real
from typing import Any, Mapping

import numpy as np

from domainfusion_bench.costs import COST_PREFIX

ACC_KEY = re.compile(r"^env(\d+)_(in|out)_acc$")
COST_KEYS = ("wall_time", "images_per_s", "mem_gb", "step_time")
METRIC_PREFIX = "metric_"  # a method's own numbers (training.MetricMeter)
# record keys renamed since: older records are read under the new name (the validity judge was the "oracle")
RENAMED = {"metric_oracle_val_acc": "metric_judge_val_acc", "cost_og_oracle_seconds": "cost_og_judge_seconds",
           "cost_oracle_classifier_train_seconds": "cost_validity_judge_train_seconds",
           "cost_reused_oracle_classifier_train_seconds": "cost_reused_validity_judge_train_seconds"}
OVERRIDES = "_overrides"  # the run's hyperparameter overrides (JSON), while the frame is built
KEY_COLUMNS = ["run", "dataset", "algorithm", "trial_seed", "hparams_seed", "test_env", "test_env2",
               "n_test_envs", "step"]


def _as_int(value: Any) -> int | None:
    kind = type(value)
    if kind is int:  # what json gives; checked first because this runs for every record
        return value
    if kind is bool:
        return None
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real) and float(value).is_integer():
        return int(value)
    if kind is str:
        try:
            return int(value)
        except ValueError:  # "--1", "²", "3.5": not a seed
            return None
    return None


def _as_float(value: Any) -> float | None:
    kind = type(value)
    if kind is float or kind is int:
        return float(value)
    if kind is bool or not isinstance(value, Real):
        return None
    return float(value)


COST_KEY_SET = frozenset(COST_KEYS)
_KEEP: dict[str, bool] = {}  # record key -> whether the frame keeps it (few distinct keys, many records)


def _args_row(args: Any) -> dict[str, Any] | None:
    """The part of a frame row that comes from a record's ``args`` (None: not usable)."""
    if not isinstance(args, Mapping):
        return None
    dataset, algorithm = args.get("dataset"), args.get("algorithm")
    test_envs = args.get("test_envs")
    if type(dataset) is not str or type(algorithm) is not str or not isinstance(test_envs, (list, tuple)):
        return None
    envs = [_as_int(t) for t in test_envs]
    trial_seed, hparams_seed = _as_int(args.get("trial_seed")), _as_int(args.get("hparams_seed"))
    if not envs or any(t is None or t < 0 for t in envs) or None in (trial_seed, hparams_seed):
        return None
    track = args.get("track")
    if type(track) is str and track and track != "DG":  # an oracle or few-shot-target row: never read as DG
        algorithm = f"{algorithm} [{track}]"
    row: dict[str, Any] = {
        "dataset": dataset,
        "algorithm": algorithm,
        "trial_seed": trial_seed,
        "hparams_seed": hparams_seed,
        "test_env": envs[0],
        "test_env2": envs[1] if len(envs) > 1 else -1,
        "n_test_envs": len(envs),
    }
    overrides = args.get("hparams")
    if overrides:  # a sweep's grid point (or fixed overrides): runs that differ here are not pooled
        row[OVERRIDES] = overrides if isinstance(overrides, str) else json.dumps(overrides, sort_keys=True)
    return row


def _keep(key: Any) -> bool:
    keep = _KEEP.get(key)
    if keep is None:
        keep = _KEEP[key] = type(key) is str and (bool(ACC_KEY.match(key)) or key in COST_KEY_SET
                                                  or key.startswith(COST_PREFIX) or key.startswith(METRIC_PREFIX))
    return keep


_NUMBER_OR_NONE = frozenset({float, int, type(None)})


def _numbers(values: list[Any], width: int) -> np.ndarray:
    """Raw record values, ``width`` per record, as a float64 matrix (records x width); NaN where a value is
    missing (None) or not a number (bools and strings are not numbers)."""
    if _NUMBER_OR_NONE.issuperset(map(type, values)):  # JSON numbers and nulls: numpy converts them itself
        try:
            return np.array(values, dtype=np.float64).reshape(-1, width)
        except OverflowError:  # an int beyond float range: the slow path says which
            pass
    out = []
    for value in values:
        try:
            number = _as_float(value)
        except OverflowError:
            number = None
        out.append(np.nan if number is None else number)
    return np.array(out, dtype=np.float64).reshape(-1, width)



def _is_number(value: Any) -> bool:
    try:
        return _as_float(value) is not None
    except OverflowError:
        return False
