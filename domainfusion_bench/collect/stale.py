"""A run's configuration, from its ``fingerprint.json``: is the run stale (made under another configuration
than its records' arguments now resolve to), and which configuration do its records belong to (the key a
table row pools runs by: the fingerprint minus seeds).

DomainBed's run dirs have no fingerprint: they are never stale and keep DomainBed's pooling."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from domainfusion_bench.errors import DfbenchError

# What differs between runs of one table row: the seeds (a random search's hparams draws come from
# hparams_seed, so the resolved values are seeds too; fixed overrides and grid points are in ``hparams``),
# and the test envs, which the row's columns already are.
SEED_FIELDS = frozenset({"trial_seed", "seed", "hparams_seed", "hparams_resolved", "test_envs"})
# The protocol settings a record's args carry (training/setup.py) that change a number; the cuDNN autotuner
# only changes speed and run-to-run noise.
SPEED_ONLY_PROTOCOL = frozenset({"cudnn_benchmark"})
_RESOLVED: dict[str, Any] = {}  # (algorithm, dataset, seeds, overrides) -> hparams or the error


def _flat(fingerprint: Mapping[str, Any]) -> dict[str, str]:
    """One comparable value per field; resolved hyperparameters one by one (``hparams_resolved.lr``)."""
    flat = {}
    for key, value in fingerprint.items():
        if key == "hparams_resolved" and isinstance(value, Mapping):
            flat.update({f"{key}.{k}": json.dumps(v, sort_keys=True) for k, v in value.items()})
        else:
            flat[key] = json.dumps(value, sort_keys=True)
    return flat


def _resolve(args: Any) -> dict[str, Any] | None:
    """The hyperparameters these arguments resolve to today; None where dfbench cannot tell without
    running a plugin (an algorithm or dataset it does not know)."""
    from domainfusion_bench.training import resolve_hparams

    key = json.dumps([args.algorithm, args.dataset, args.hparams_seed, args.trial_seed, args.hparams])
    if key not in _RESOLVED:
        try:
            _RESOLVED[key] = resolve_hparams(args)
        except DfbenchError:
            _RESOLVED[key] = None
    return _RESOLVED[key]


def fingerprint_now(args: Mapping[str, Any], hparams: Any, recorded: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint dfbench gives a run with these record ``args`` today. What it cannot know without
    running a plugin is taken as ``recorded`` (the run's fingerprint.json) or the records' ``hparams``."""
    from domainfusion_bench.data import run_identity
    from domainfusion_bench.protocol import semantic_args
    from domainfusion_bench.training import TrainArgs

    names = {f.name for f in dataclasses.fields(TrainArgs)}
    # plugins count by content, which only the fingerprint knows: they are compared as recorded there
    train_args = TrainArgs(**{k: v for k, v in args.items() if k in names and k != "plugins"})
    try:
        identity = run_identity(dataclasses.asdict(train_args))
    except DfbenchError:  # a dataset only a plugin registers: its version as recorded
        identity = dataclasses.asdict(train_args)
        if "dataset_version" in recorded:
            identity["dataset_version"] = recorded["dataset_version"]
    now = semantic_args(identity)
    if "plugin_sha256" in recorded:
        now["plugin_sha256"] = recorded["plugin_sha256"]
    resolved = _resolve(train_args)
    return {**now, "hparams_resolved": hparams if resolved is None else resolved}


def stale_reason(fingerprint: Mapping[str, Any], args: Any, hparams: Any) -> str | None:
    """Why a run whose records carry ``args`` / ``hparams`` is stale; None when it is not."""
    if not isinstance(args, Mapping):
        return "its records have no args to check against its fingerprint.json"
    now = json.loads(json.dumps(fingerprint_now(args, hparams, fingerprint)))  # as JSON gives it back
    if now == fingerprint:  # the usual run: one comparison, no per-field text
        return None
    theirs, ours = _flat(fingerprint), _flat(now)
    differs = sorted(k for k in set(theirs) | set(ours) if theirs.get(k, "<missing>") != ours.get(k, "<missing>"))
    if not differs:
        return None
    shown = "; ".join(f"{k}: {theirs.get(k, '<missing>')} in fingerprint.json, {ours.get(k, '<missing>')} now"
                      for k in differs[:4])
    more = f"; and {len(differs) - 4} more" if len(differs) > 4 else ""
    return f"made under another configuration than its records' args resolve to now ({shown}{more})"


def configuration(fingerprint: Mapping[str, Any], args: Any) -> str:
    """The key of the table row this run's records belong to, as JSON: the fingerprint minus seeds, the
    hyperparameter overrides by name (grid points read ``ERM [lr=0.001]``) and the protocol settings the
    records say the run used (``precision`` as run, not ``auto``)."""
    key = {k: v for k, v in fingerprint.items() if k not in SEED_FIELDS and k != "hparams"}
    overrides = fingerprint.get("hparams")
    try:
        overrides = json.loads(overrides) if isinstance(overrides, str) else overrides
    except ValueError:
        overrides = {"hparams": overrides}
    key.update(overrides if isinstance(overrides, dict) else {})
    protocol = args.get("protocol") if isinstance(args, Mapping) else None
    for name, value in (protocol.items() if isinstance(protocol, Mapping) else ()):
        if name in SPEED_ONLY_PROTOCOL:
            continue
        if isinstance(value, Mapping):  # e.g. the image store: whether it ran and how, not the sentence why
            value = {k: v for k, v in value.items() if k != "why"}
        key["dataset_differences" if name == "dataset" else name] = value
    return json.dumps(key, sort_keys=True)
