"""Make the models shipped with the package (``domainfusion_bench/shipped_models``), from a trained model.

    python -m domainfusion_bench.shipping ddpm <snapshot folder> --dataset DigitStyles --test_envs 2 --steps N
    python -m domainfusion_bench.shipping judge --dataset DigitStyles --test_envs 2
    python -m domainfusion_bench.shipping oracle-ddpm --dataset DigitStyles --test_envs 2 --trial_seed 0

A shipped model has the key of the model that ``dfbench diffusion train`` (or a run) would train with the same
config, so the cached-model store serves it in place of training; its card (``card.json`` + ``MODEL_CARD.md``)
lists the domains it saw (read by the leakage guard) and the sha256 of every file. A DDPM snapshot saved at step
n of a longer run (``train_pixel_ddpm(snapshot_every=...)``) is, with the constant learning rate, the model
``--steps n`` trains, so it ships under that config's key. ``DFBENCH_NO_SHIPPED=1`` makes every store ignore the
shipped models (to reproduce one, or to pay for training on purpose).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import torch

from domainfusion_bench.diffusion.store import SHIPPED_DIR, ModelStore, write_shipped
from domainfusion_bench.diffusion.trainer import ddpm_where, default_config
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.protocol import HOLDOUT_FRACTION


def _train_envs(dataset, test_envs: Sequence[int]) -> list[int]:
    dataset.check_test_envs(test_envs)
    return [e for e in range(len(dataset.domains)) if e not in test_envs]


def ship_ddpm(snapshot: Path, dataset, test_envs: Sequence[int], steps: int, *, dest_root: Path = SHIPPED_DIR,
              trial_seed: int = 0, holdout_fraction: float = HOLDOUT_FRACTION, notes: str = "", half: bool = True) -> Path:
    """Ship a saved pixel DDPM (``PixelDDPMBackbone.save``'s folder) under the key of ``default_config(steps)``."""
    snapshot = Path(snapshot)
    meta = json.loads((snapshot / "backbone.json").read_text())
    train_envs = _train_envs(dataset, test_envs)
    config = default_config(dataset, steps=steps)
    trained = meta["info"].get("train_config", {})
    expected = {**config.to_json(), "steps": trained.get("steps")}
    if trained != expected:
        raise DfbenchError(f"the snapshot's training config {trained} is not default_config's {expected} (besides steps)")
    if meta["info"].get("steps_done", steps) != steps:
        raise DfbenchError(f"the snapshot is of step {meta['info']['steps_done']}, not {steps}")
    if sorted(meta["seen_domains"]) != train_envs:
        raise DfbenchError(f"the snapshot saw domains {meta['seen_domains']}, not the training domains {train_envs}")
    store = ModelStore(Path(tempfile.mkdtemp()), shipped=None)
    where = ddpm_where(dataset, train_envs, trial_seed, holdout_fraction, config)
    identity = store.identity("pixel_ddpm", **where)
    key = store.key_of(identity)
    info = dict(meta["info"], train_config=config.to_json(), made_by="dfbench shipped pixel_ddpm")
    staging = Path(tempfile.mkdtemp()) / "model"
    shutil.copytree(snapshot, staging)
    (staging / "backbone.json").write_text(json.dumps({**meta, "key": key, "info": info}, indent=1))
    command = (f"DFBENCH_NO_SHIPPED=1 dfbench diffusion train --dataset {dataset.name} --test_envs {' '.join(map(str, test_envs))} "
               f"--steps {steps} --trial_seed {trial_seed}")
    card_info = {k: info[k] for k in ("final_loss", "trained_on", "train_seconds", "device", "split") if k in info}
    card_info.update(train_config=config.to_json(), steps=steps, notes=notes)
    card_text = model_card(dataset, "pixel_ddpm", key, train_envs, test_envs, command, card_info, half)
    dest = write_shipped(staging, dest_root, kind="pixel_ddpm", key=key, identity=identity, dataset=dataset,
                         seen_envs=train_envs, train_seconds=float(info.get("train_seconds", 0.0)), command=command,
                         info=card_info, card_text=card_text, half=half)
    shutil.rmtree(staging.parent, ignore_errors=True)
    (dest / "MODEL_CARD.md").write_text(card_text + _checksums(dest))
    return dest


def ship_judge(dataset, test_envs: Sequence[int], *, dest_root: Path = SHIPPED_DIR, trial_seed: int = 0,
                holdout_fraction: float = HOLDOUT_FRACTION, resolution: int | None = None, hparams: dict | None = None) -> Path:
    """Train the validity judge a run with default hyperparameters would train, and ship it."""
    from domainfusion_bench.algorithms.validity import JUDGE_KIND, judge_hparams, validity_judge
    from domainfusion_bench.hparams import HParamSpace

    space = HParamSpace()
    judge_hparams(space)
    hp = {**space.defaults(), **(hparams or {})}
    train_envs = _train_envs(dataset, test_envs)
    resolution = resolution or default_config(dataset).model.resolution
    store = ModelStore(Path(tempfile.mkdtemp()), shipped=None)
    context = SimpleNamespace(dataset=dataset, train_envs=train_envs, args=SimpleNamespace(trial_seed=trial_seed, holdout_fraction=holdout_fraction),
                              models=store, costs=None, made_by=f"dfbench shipped {JUDGE_KIND}", device="cpu",
                              heartbeat=lambda: None)
    entry = validity_judge(context, resolution, hp, charge=False)
    command = (f"DFBENCH_NO_SHIPPED=1 python -m domainfusion_bench.shipping judge --dataset {dataset.name} "
               f"--test_envs {' '.join(map(str, test_envs))}  (trains it as a run does: {JUDGE_KIND})")
    card_info = dict(entry.info, config=entry.meta["identity"]["config"], train_seconds=entry.train_seconds)
    card_text = model_card(dataset, JUDGE_KIND, entry.key, train_envs, test_envs, command, card_info, False)
    dest = write_shipped(entry.path, dest_root, kind=JUDGE_KIND, key=entry.key, identity=entry.meta["identity"],
                         dataset=dataset, seen_envs=train_envs, train_seconds=entry.train_seconds, command=command,
                         info=entry.info, card_text=card_text)
    (dest / "MODEL_CARD.md").write_text(card_text + _checksums(dest))
    return dest


def ship_oracle_ddpm(dataset, test_envs: Sequence[int], *, trial_seed: int = 0, dest_root: Path = SHIPPED_DIR,
                     holdout_fraction: float = HOLDOUT_FRACTION, store_dir: Path | None = None) -> Path:
    """Ship CDGA*'s oracle DDPM for one trial: found in (or fine-tuned into) the store at ``store_dir`` from
    the shipped DDPM, exactly as a CDGA* run with default hyperparameters makes it."""
    from domainfusion_bench.diffusion.oracle_ddpm import ORACLE_STEPS, train_oracle_ddpm
    from domainfusion_bench.diffusion.trainer import train_pixel_ddpm

    train_envs = _train_envs(dataset, test_envs)
    config = default_config(dataset)
    runs = ModelStore(store_dir or Path(tempfile.mkdtemp()))  # the base DDPM comes from the shipped models
    base = train_pixel_ddpm(dataset, train_envs, test_envs, trial_seed=trial_seed, holdout_fraction=holdout_fraction,
                            config=config, store=runs, allow_condition_on_held_out=True)
    oracle = train_oracle_ddpm(base.backbone, dataset, train_envs, test_envs, trial_seed=trial_seed,
                               holdout_fraction=holdout_fraction, config=config, store=runs, device="cpu",
                               made_by="dfbench shipped oracle_pixel_ddpm")
    meta = json.loads((oracle.path / "meta.json").read_text())
    seen = sorted(meta["identity"]["seen_envs"])
    held = ", ".join(dataset.domains[e] for e in test_envs)
    command = (f"python -m domainfusion_bench.shipping oracle-ddpm --dataset {dataset.name} --test_envs "
               f"{' '.join(map(str, test_envs))} --trial_seed {trial_seed}  (fine-tunes the shipped pixel DDPM "
               f"{ORACLE_STEPS} steps as a CDGA* run does)")
    info = {**meta["info"], "oracle_of": base.key, "steps": ORACLE_STEPS, "train_seconds": oracle.train_seconds,
            "config": meta["identity"]["config"]}
    card_text = "\n".join([
        f"# oracle_pixel_ddpm for {dataset.name}, {held} held out, trial seed {trial_seed} (CDGA* only)", "",
        f"- store key: `{oracle.key}`", f"- starts from the shipped pixel DDPM `{base.key}`",
        f"- data: the training domains' in-splits (trial seeds 0-2) and **{held}'s out-split under trial seed "
        f"{trial_seed} only** (the images oracle selection validates on; never its in-split, where test accuracy "
        f"is read); domains drawn equally often", "- only oracle rows may use it: the leakage guard refuses it to every other run",
        f"- reproduce: `{command}`", "- weights: safetensors, float16 (trained in float32; loaded back as float32)",
        f"- made: {time.strftime('%Y-%m-%d')}", "", "## Config and measurements", "", "```json",
        json.dumps(info, indent=1, default=str), "```", ""])
    dest = write_shipped(oracle.path, dest_root, kind="oracle_pixel_ddpm", key=oracle.key, identity=meta["identity"],
                         dataset=dataset, seen_envs=seen, train_seconds=oracle.train_seconds, command=command,
                         info=info, card_text=card_text, half=True)
    (dest / "MODEL_CARD.md").write_text(card_text + _checksums(dest))
    return dest


def _checksums(dest: Path) -> str:
    card = json.loads((dest / "card.json").read_text())
    return "\n## Files (sha256)\n\n" + "".join(f"- `{name}`: `{sha}`\n" for name, sha in sorted(card["files"].items()))


def model_card(dataset, kind: str, key: str, train_envs, test_envs, command: str, info: dict, half: bool) -> str:
    seen = ", ".join(dataset.domains[e] for e in train_envs)
    held = ", ".join(dataset.domains[e] for e in test_envs)
    lines = [f"# {kind} for {dataset.name}, {held} held out", "",
             f"- store key: `{key}` (the cached-model store serves this model wherever it would train this key)",
             f"- data: the in-splits of the training domains **{seen}** (images in-split under trial seeds 0-2); "
             f"**{held} never seen**; the leakage guard refuses this model to a run that holds out any of {seen}",
             f"- reproduce: `{command}`",
             f"- weights: safetensors, {'float16 (trained in float32; loaded back as float32)' if half else 'float32'}",
             f"- made: {time.strftime('%Y-%m-%d')}", "", "## Config and measurements", "", "```json",
             json.dumps(info, indent=1, default=str), "```", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    from domainfusion_bench.data import get_dataset
    from domainfusion_bench.paths import DEFAULT_DATA_DIR

    p = argparse.ArgumentParser(prog="python -m domainfusion_bench.shipping")
    p.add_argument("what", choices=["ddpm", "judge", "oracle-ddpm"])
    p.add_argument("snapshot", nargs="?", help="ddpm: the saved model folder (a snapshot of train_pixel_ddpm)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--test_envs", type=int, nargs="+", required=True)
    p.add_argument("--steps", type=int, help="ddpm: the steps of the snapshot")
    p.add_argument("--notes", default="")
    p.add_argument("--trial_seed", type=int, default=0, help="oracle-ddpm: the trial whose out-split it sees")
    p.add_argument("--store_dir", help="oracle-ddpm: a model store that may already hold it (e.g. <data>/.dfbench_cache/models)")
    p.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
    ns = p.parse_args(argv)
    torch.set_num_threads(1)
    dataset = get_dataset(ns.dataset, ns.data_dir)
    if ns.what == "ddpm":
        if not ns.snapshot or not ns.steps:
            raise DfbenchError("shipping a ddpm needs the snapshot folder and --steps")
        print(ship_ddpm(Path(ns.snapshot), dataset, ns.test_envs, ns.steps, notes=ns.notes))
    elif ns.what == "oracle-ddpm":
        print(ship_oracle_ddpm(dataset, ns.test_envs, trial_seed=ns.trial_seed,
                               store_dir=Path(ns.store_dir) if ns.store_dir else None))
    else:
        print(ship_judge(dataset, ns.test_envs))


if __name__ == "__main__":
    main()
