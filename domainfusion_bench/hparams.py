"""Hyperparameter spaces: a default and a random distribution per name (DESIGN.md section 3).

``hparams_seed == 0`` gives the defaults; otherwise each name is drawn from its own stream seeded by
``seed_hash(seed_hash(hparams_seed, trial_seed), name)``, exactly as DomainBed draws them.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

import numpy as np

from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.protocol import hparam_rng, hparams_random_seed

Sampler = Callable[[np.random.RandomState], Any]


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars, so hparams serialise to JSON unchanged."""
    return value.item() if isinstance(value, np.generic) else value


class HParamSpace:
    """Ordered name -> (default, sampler). Algorithms extend it in ``Algorithm.hparam_space``."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Any, Sampler]] = {}

    def add(self, name: str, default: Any, sample: Sampler | None = None) -> None:
        """Declare ``name``; without ``sample`` the value is fixed at ``default`` in random draws too."""
        self._entries[name] = (default, sample or (lambda r, d=default: d))

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return list(self._entries)

    def defaults(self) -> dict[str, Any]:
        return {name: default for name, (default, _) in self._entries.items()}

    def draw(self, random_seed: int) -> dict[str, Any]:
        return {name: _plain(sample(hparam_rng(random_seed, name))) for name, (_, sample) in self._entries.items()}

    def sample(self, hparams_seed: int, trial_seed: int) -> dict[str, Any]:
        if hparams_seed == 0:
            return self.defaults()
        return self.draw(hparams_random_seed(hparams_seed, trial_seed))


def base_space(dataset: type) -> HParamSpace:
    """What every algorithm shares: DomainBed's values for lr, batch_size, weight_decay, dropout.

    ``dataset`` is a MultiDomainDataset class: its name, SMALL_IMAGES and CNN_WIDTH matter here.
    """
    dataset_name = getattr(dataset, "registered_name", dataset.__name__)
    small_images = dataset.SMALL_IMAGES
    space = HParamSpace()
    space.add("data_augmentation", True)
    space.add("backbone", "auto")  # auto: small CNN for MNIST-sized inputs, else ResNet-50
    space.add("pretrained", "imagenet")  # imagenet | none | path to a state_dict file
    space.add("freeze_bn", True)
    space.add("resnet_dropout", 0.0, lambda r: r.choice([0.0, 0.1, 0.5]))
    space.add("nonlinear_classifier", False)
    space.add("cnn_width", dataset.CNN_WIDTH)  # channels of the small CNN (MNIST-sized inputs)
    if small_images:
        space.add("lr", 1e-3, lambda r: 10 ** r.uniform(-4.5, -2.5))
        space.add("weight_decay", 0.0)
        space.add("batch_size", 64, lambda r: int(2 ** r.uniform(3, 9)))
    else:
        space.add("lr", 5e-5, lambda r: 10 ** r.uniform(-5, -3.5))
        space.add("weight_decay", 0.0, lambda r: 10 ** r.uniform(-6, -2))
        high = 5 if dataset_name == "DomainNet" else 5.5
        space.add("batch_size", 32, lambda r: int(2 ** r.uniform(3, high)))
    return space


def parse_hparams_json(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DfbenchError(
            f"--hparams is not valid JSON ({err.msg} at column {err.colno}): {text!r}. "
            'Example: --hparams \'{"lr": 1e-4, "batch_size": 16}\''
        ) from None
    if not isinstance(value, dict):
        raise DfbenchError(f"--hparams must be a JSON object of name: value, got {type(value).__name__}: {text!r}")
    return value


# Ranges of hyperparameters by name (every algorithm's), checked on overrides: (low, low inclusive,
# high, high inclusive); None = unbounded.
RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "lr": (0, False, None, False),
    "batch_size": (1, True, None, False),
    "weight_decay": (0, True, None, False),
    "resnet_dropout": (0, True, 1, False),
    "cnn_width": (1, True, None, False),
    "diti_finetune_batch": (0, True, None, False),
    "df_ld_batch": (0, True, None, False),
}


def _range_for(name: str) -> tuple[float | None, bool, float | None, bool] | None:
    if name in RANGES:
        return RANGES[name]
    if name.endswith("_lr") or name.startswith("lr_"):
        return RANGES["lr"]
    if name.endswith("batch_size") or name.endswith("_steps") or name.endswith("_width"):
        return (1, True, None, False)
    if name.endswith("_fraction") or name.endswith("_prob") or name.endswith("dropout"):
        return (0, True, 1, True)
    return None


def _describe(r: tuple[float | None, bool, float | None, bool]) -> str:
    low, low_in, high, high_in = r
    parts = []
    if low is not None:
        parts.append(f"{'>=' if low_in else '>'} {low:g}")
    if high is not None:
        parts.append(f"{'<=' if high_in else '<'} {high:g}")
    return " and ".join(parts)


def check_value(name: str, default: Any, value: Any, where: str) -> None:
    """One clear error when an override has the wrong type (booleans are booleans, integers integers,
    strings strings) or lies outside the hyperparameter's range."""
    def fail(what: str) -> DfbenchError:
        return DfbenchError(f"hyperparameter {name} for {where} must be {what}, got {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise fail("true or false (a JSON boolean)")
        return
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"a number like its default {default!r}")
        if isinstance(value, float) and not value.is_integer():
            raise fail(f"an integer like its default {default!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"a number like its default {default!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise fail("a finite number")
    elif isinstance(default, str):
        # a list of strings is a string setting's long form (e.g. mix_stages: "block2,block3" or [block2, block3])
        if not isinstance(value, str) and not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            raise fail(f"a string like its default {default!r}")
        return
    else:
        return
    bounds = _range_for(name)
    if bounds is None:
        return
    low, low_in, high, high_in = bounds
    if (low is not None and (value < low or (value == low and not low_in))) or \
            (high is not None and (value > high or (value == high and not high_in))):
        raise fail(_describe(bounds))


# hyperparameters renamed when the validity classifier became the "validity judge" (oracle = held-out only)
RENAMED = {"og_oracle_width": "og_judge_width", "og_oracle_steps": "og_judge_steps", "og_oracle_lr": "og_judge_lr"}


def apply_overrides(hparams: dict[str, Any], overrides: Mapping[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(overrides) - set(hparams))
    if unknown:
        renamed = [f"{k} is now {RENAMED[k]}" for k in unknown if RENAMED.get(k) in hparams]
        hint = f" ({'; '.join(renamed)})" if renamed else ""
        raise DfbenchError(
            f"unknown hyperparameter(s) {', '.join(unknown)} for {where}{hint}. Known: {', '.join(sorted(hparams))}."
        )
    merged = dict(hparams)
    for name, value in overrides.items():
        check_value(name, hparams[name], value, where)
        if isinstance(hparams[name], int) and not isinstance(hparams[name], bool):
            value = int(value)  # 64.0 from YAML/JSON is the integer 64
        merged[name] = value
    return merged


TRACKERS = ("tensorboard", "wandb", "mlflow", "aim")  # accelerate's trackers that --log_with offers


def check_train_args(args: Any) -> None:
    """Training arguments in range, one clear line each (the CLI's types are checked by argparse; a
    TrainArgs built in Python or by a sweep spec is checked here)."""
    def fail(name: str, what: str) -> DfbenchError:
        return DfbenchError(f"--{name} must be {what}, got {getattr(args, name)!r}")

    def integer(name: str, least: int, optional: bool = True) -> None:
        value = getattr(args, name)
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise fail(name, f"an integer >= {least}")

    integer("steps", 1)
    integer("checkpoint_freq", 1)
    integer("hparams_seed", 0, optional=False)
    integer("trial_seed", 0, optional=False)
    integer("seed", 0, optional=False)
    integer("num_workers", 0)
    integer("eval_batch_size", 1)
    h = args.holdout_fraction
    if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0 < h < 1:
        raise fail("holdout_fraction", "a number between 0 and 1 (exclusive), e.g. 0.2")
    envs = args.test_envs
    if not isinstance(envs, (list, tuple)) or not envs or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in envs):
        raise fail("test_envs", "one or more domain indices >= 0")
    if len(set(envs)) != len(envs):
        raise fail("test_envs", "distinct domain indices")
    choices = {"eval_splits": ("needed", "all"), "precision": ("auto", "bf16", "fp32")}
    for name, allowed in choices.items():
        if getattr(args, name) not in allowed:
            raise fail(name, " | ".join(allowed))
    u = args.uda_holdout_fraction
    if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 <= u < 1:
        raise fail("uda_holdout_fraction", "a number in [0, 1), e.g. 0.2 (DomainBed's share of the held-out in-split "
                   "given unlabelled to the algorithm)")
    if args.task not in ("domain_generalization", "domain_adaptation"):
        raise fail("task", "domain_generalization | domain_adaptation")
    if args.task == "domain_adaptation" and u == 0:
        raise DfbenchError("--task domain_adaptation needs unlabelled held-out data: add --uda_holdout_fraction, "
                           "e.g. 0.2 (DomainBed's flag)")
    log_with = args.log_with
    if log_with is not None and (not isinstance(log_with, str) or not all(
            t.strip() in TRACKERS for t in log_with.split(","))):
        raise fail("log_with", f"one or more of {', '.join(TRACKERS)}, comma-separated")
    device = args.device
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or
                                           (device.startswith("cuda:") and device[5:].isdigit())):
        raise fail("device", "auto | cpu | cuda | cuda:N")
