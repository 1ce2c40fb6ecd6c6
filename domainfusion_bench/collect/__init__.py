"""Load the records of run directories into one pandas frame (DESIGN.md section 2: collector).

Reads dfbench run dirs and DomainBed run dirs unchanged: both hold a ``results.jsonl`` (one JSON object
per checkpoint, with ``args`` naming dataset / algorithm / test_envs / hparams_seed / trial_seed, a
``step`` and ``env{i}_in_acc`` / ``env{i}_out_acc`` keys) and a ``done`` file once finished.

Never crashes on a damaged file: a truncated or non-JSON line, or a JSON line that is not a usable
record, is skipped and counted; the loader warns once with the counts. Runs without a ``done`` file are
ignored (a crashed or still-running run is not a result) unless ``include_incomplete``.

The frame has one row per record and these columns:

- ``run``: the run dir, relative to the collected root;
- ``dataset``, ``algorithm`` (str), ``trial_seed``, ``hparams_seed``, ``step`` (int);
- ``test_env`` (the first test env), ``test_env2`` (the second, -1 for a single-test-env run) and
  ``n_test_envs``;
- ``env{i}_in_acc`` / ``env{i}_out_acc`` for every key any record has (NaN where a record lacks it);
- cost columns where present: ``wall_time``, ``images_per_s``, ``mem_gb``, ``step_time`` and every
  ``cost_*`` key.
"""

from domainfusion_bench.frames import infer_n_envs, records_to_frame
from domainfusion_bench.collect.load import Collection, CollectWarning, load_records

__all__ = ["Collection", "CollectWarning", "infer_n_envs", "load_records", "records_to_frame"]
