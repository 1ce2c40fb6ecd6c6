"""``train``: one run directory taken (or skipped if done), its logs, and ``failed`` when it crashes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import traceback
from pathlib import Path

from domainfusion_bench import runfiles
from domainfusion_bench.algorithms import ALGORITHMS, load_plugins
from domainfusion_bench.data import run_identity
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.hparams import check_train_args
from domainfusion_bench.protocol import run_hash
from domainfusion_bench.training.args import DEFAULT_OUTPUT_ROOT, TrainArgs, resolve_hparams, run_fingerprint
from domainfusion_bench.training.logs import _logs_to
from domainfusion_bench.training.loop import _train
from domainfusion_bench.training.runtime import Runtime


def train(args: TrainArgs) -> Path:
    """Run (or resume, or skip if done) one training run; returns its run directory."""
    check_train_args(args)
    load_plugins(args.plugins)
    ALGORITHMS.get(args.algorithm)  # fail fast on an unknown name, before loading data
    hparams = resolve_hparams(args)
    if args.output_dir is None:  # one dir per configuration, never a shared one
        args = dataclasses.replace(args, output_dir=str(Path(DEFAULT_OUTPUT_ROOT) / run_hash(run_identity(dataclasses.asdict(args)))))
    run_dir = Path(args.output_dir)
    fingerprint = run_fingerprint(args, hparams)
    runfiles.check_fingerprint(run_dir, fingerprint)
    if (run_dir / runfiles.DONE).exists():
        print(f"{run_dir} is already done; nothing to do.")
        return run_dir
    runtime = Runtime(args)
    beat = contextlib.nullcontext()
    if runtime.is_main:
        claimed, holder = runfiles.claim(run_dir, token=os.environ.get(runfiles.CLAIM_ENV))
        if not claimed:  # the loser writes nothing into the run
            raise DfbenchError(
                f"{run_dir} is being trained right now by process {holder.get('pid')} on {holder.get('host', '?')} "
                "(see its lock file): wait for it to finish, or stop that process and run this again to resume"
            )
        runfiles.check_fingerprint(run_dir, fingerprint)  # again, now that the run is ours
        (run_dir / runfiles.FAILED).unlink(missing_ok=True)
        runfiles.write_fingerprint(run_dir, fingerprint)
        beat = runfiles.Heartbeat(run_dir)
    try:
        with beat, _logs_to(run_dir, runtime.is_main):
            _train(args, hparams, runtime, run_dir)
    except BaseException as err:
        if runtime.is_main and runfiles.holds_lock(run_dir):
            reason = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=8)}
            runfiles.atomic_write_text(run_dir / runfiles.FAILED, json.dumps(reason, indent=1))
        raise
    finally:
        if runtime.is_main:
            runfiles.release_lock(run_dir)
    return run_dir
