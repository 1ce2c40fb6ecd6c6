"""The DomainBed-compatible protocol facts, in one place (DESIGN.md section 3).

Everything that must match DomainBed bit for bit lives here: the seed hash, the in/out split rule,
the seed of a random hyperparameter draw, and the hash that names a run directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from domainfusion_bench.errors import DfbenchError

HOLDOUT_FRACTION = 0.2

# Training arguments that do not change what a run computes: moving the data or the results,
# another launcher, more data workers or a bigger evaluation batch must not re-key a sweep. Plugins
# count by their files' content (``plugin_digests``), not by where they live.
NON_SEMANTIC_ARGS = frozenset(
    {"data_dir", "output_dir", "launcher", "device", "plugins", "skip_model_save", "num_workers", "eval_batch_size",
     "gen_batch_size"}
)


def seed_hash(*args: Any) -> int:
    """Integer of the md5 of ``str(args)``, mod 2**31: DomainBed's ``misc.seed_hash``."""
    digest = hashlib.md5(str(args).encode("utf-8")).hexdigest()
    return int(digest, 16) % (2**31)


def split_indices(n: int, trial_seed: int, domain: int, holdout_fraction: float = HOLDOUT_FRACTION):
    """DomainBed's split of domain ``domain`` with ``n`` examples: returns (out_indices, in_indices).

    The *out* split (the first ``int(n * holdout_fraction)`` of a seeded shuffle) is validation,
    the *in* split is training data (and the reported test accuracy on held-out domains).
    """
    keys = list(range(n))
    np.random.RandomState(seed_hash(trial_seed, domain)).shuffle(keys)
    n_out = int(n * holdout_fraction)
    return keys[:n_out], keys[n_out:]


def hparams_random_seed(hparams_seed: int, trial_seed: int) -> int:
    """Seed of a random hyperparameter draw (DomainBed's train.py)."""
    return seed_hash(hparams_seed, trial_seed)


def hparam_rng(random_seed: int, name: str) -> np.random.RandomState:
    """Each hyperparameter has its own stream, so adding one never shifts the others."""
    return np.random.RandomState(seed_hash(random_seed, name))


def plugin_digests(paths: Sequence[str]) -> list[str]:
    """sha256 of each plugin file's content, sorted: editing a plugin re-keys its runs, moving it does not."""
    digests = []
    for path in paths:
        try:
            digests.append(hashlib.sha256(Path(path).read_bytes()).hexdigest())
        except OSError as err:
            raise DfbenchError(f"plugin file {path} cannot be read ({err.strerror}); --plugins takes paths to .py files") from None
    return sorted(digests)


# Arguments added after runs were hashed: left out at these defaults, so existing run hashes stay valid.
OMITTED_AT_DEFAULT = {"no_image_store": False}


def semantic_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """The training arguments that change the result, plugins by content (what a run's hash covers)."""
    semantic = {k: v for k, v in args.items() if k not in NON_SEMANTIC_ARGS
                and not (k in OMITTED_AT_DEFAULT and v == OMITTED_AT_DEFAULT[k])}
    if args.get("plugins"):
        semantic["plugin_sha256"] = plugin_digests(args["plugins"])
    return semantic


def run_hash(args: Mapping[str, Any]) -> str:
    """Name of a run directory: md5 of the training arguments that change the result."""
    return hashlib.md5(json.dumps(semantic_args(args), sort_keys=True).encode("utf-8")).hexdigest()
