"""The files of a run directory, written so that a crash never leaves a half-truth behind.

``results.jsonl`` one record per checkpoint; ``done`` written last and atomically; ``failed`` holds the
reason a run crashed; ``lock`` says which process runs it (and its heartbeat); ``resume.pt`` the state
a relaunch continues from; ``splits.json`` the exact in/out indices of every domain; ``fingerprint.json``
the arguments that define the run (a directory never mixes two configurations); ``submitted.json`` the
Slurm job that will run it, while that job is pending.

Modules by file: ``names`` the file names; ``files`` atomic writes; ``records`` results.jsonl; ``locks``
the lock, its claim and heartbeat; ``fingerprint``; ``submission`` submitted.json; ``resume`` resume.pt;
``splits`` splits.json; ``previews`` the previews/ folder of generated images and its index.
"""

from domainfusion_bench.runfiles.files import atomic_write_text, read_json
from domainfusion_bench.runfiles.fingerprint import check_fingerprint, write_fingerprint
from domainfusion_bench.runfiles.locks import (
    CLAIM_ENV, CLAIM_MUTEX_STALE_S, HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S, Heartbeat, LostClaim, check_claim,
    claim, claim_lost, claimed, heartbeat, holds_lock, lock_holder, pid_alive, release_lock, write_lock,
)
from domainfusion_bench.runfiles.names import (
    CLAIM_MUTEX, DONE, FAILED, FINGERPRINT, LOCK, MODEL, PREVIEWS, RESULTS, RESUME, SHARED_SPLITS, SPLITS, SUBMITTED,
)
from domainfusion_bench.runfiles.previews import PreviewStrip, read_previews, write_previews
from domainfusion_bench.runfiles.records import (
    append_record, iter_run_dirs, keep_records_through, loads, read_records, write_done,
)
from domainfusion_bench.runfiles.resume import load_resume, save_resume
from domainfusion_bench.runfiles.splits import read_splits, write_splits
from domainfusion_bench.runfiles.submission import SUBMITTED_TIMEOUT_S, pending_submission, record_submission

__all__ = [
    "CLAIM_ENV", "CLAIM_MUTEX", "CLAIM_MUTEX_STALE_S", "DONE", "FAILED", "FINGERPRINT", "HEARTBEAT_INTERVAL_S",
    "HEARTBEAT_TIMEOUT_S", "LOCK", "MODEL", "PREVIEWS", "RESULTS", "RESUME", "SHARED_SPLITS", "SPLITS", "SUBMITTED",
    "SUBMITTED_TIMEOUT_S", "Heartbeat", "LostClaim", "PreviewStrip", "read_previews", "write_previews",
    "append_record", "atomic_write_text", "check_claim", "check_fingerprint", "claim", "claim_lost", "claimed",
    "heartbeat", "holds_lock", "iter_run_dirs", "keep_records_through", "load_resume", "loads", "lock_holder",
    "pending_submission", "pid_alive", "read_json", "read_records", "read_splits", "record_submission",
    "release_lock", "save_resume", "write_done", "write_fingerprint", "write_lock", "write_splits",
]
