"""The DomainBed-compatible protocol facts, in one place (DESIGN.md section 3).

Everything that must match DomainBed bit for bit lives here: the seed hash, the in/out split rule,
the seed of a random hyperparameter draw, and the hash that names a run directory.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import numpy as np

HOLDOUT_FRACTION = 0.2

# Training arguments that do not change what a run computes: moving the data or the results,
# or choosing another launcher, must not re-key a sweep.
NON_SEMANTIC_ARGS = frozenset(
    {"data_dir", "output_dir", "launcher", "device", "plugins", "skip_model_save", "eval_splits"}
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


def run_hash(args: Mapping[str, Any]) -> str:
    """Name of a run directory: md5 of the training arguments that change the result."""
    semantic = {k: v for k, v in args.items() if k not in NON_SEMANTIC_ARGS}
    return hashlib.md5(json.dumps(semantic, sort_keys=True).encode("utf-8")).hexdigest()
