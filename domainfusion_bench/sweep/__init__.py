"""Sweeps: a YAML spec -> a validated ``SweepSpec`` -> jobs (hashed run dirs) -> run states.

A job is one ``training.TrainArgs``; its run dir is ``<output_dir>/<protocol.run_hash(args)>``, so the
same arguments always land in the same dir and moving the data (or the results) never re-keys a sweep.
A run's state is read from its dir alone (``runfiles``): ``done`` file -> done; a lock held by a live
process (or, from another host, a recent heartbeat) -> running; a ``failed`` file or a lock whose
process is gone -> failed; nothing -> not launched. Launching is in ``launchers``.
"""

from domainfusion_bench.sweep.jobs import Job, check_data, make_jobs, module_prefix, train_argv
from domainfusion_bench.sweep.spec import (
    SPEC_KEYS, SWEEP_SET_ARGS, TEST_ENV_MODES, SweepSpec, load_spec, n_domains, parse_spec, train_arg_names,
    with_plugins,
)
from domainfusion_bench.sweep.spec_file import load_yaml, read_spec_file
from domainfusion_bench.sweep.states import (
    STATUS_ORDER, RunState, State, count_states, delete_incomplete, failure_reason, format_counts, job_states,
    last_line, print_status, remove_if_failed, run_state,
)

__all__ = [
    "Job", "RunState", "SPEC_KEYS", "STATUS_ORDER", "SWEEP_SET_ARGS", "State", "SweepSpec", "TEST_ENV_MODES",
    "check_data", "count_states", "delete_incomplete", "failure_reason", "format_counts", "job_states",
    "last_line", "load_spec", "load_yaml", "make_jobs", "module_prefix", "n_domains", "parse_spec",
    "print_status", "read_spec_file", "remove_if_failed", "run_state", "train_arg_names", "train_argv",
    "with_plugins",
]
