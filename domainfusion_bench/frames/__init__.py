"""Records (dicts as in results.jsonl) -> one pandas frame, one row per record: what ``collect`` builds
from run dirs and ``selection`` builds from a list of records. Below both, so that selection stays a pure
function of records and imports nothing of the collector."""

from domainfusion_bench.frames.build import infer_n_envs, records_to_frame

__all__ = ["infer_n_envs", "records_to_frame"]
