"""The oracle pixel DDPM: the run's DDPM fine-tuned on the held-out domain's *out-split* as well, for oracle rows
(CDGA*) only.

An oracle row asks "what would this method gain with a generator that knows the target domain?". A label-
conditioned DDPM trained on the training domains alone cannot answer it: its held-out domain embedding was
never trained, so conditioning on it carries no information. This model has seen the held-out domain, but
only the images of its out-split under this trial's seed: the images DomainBed's oracle model selection
validates on, never the in-split that the run's test accuracy reads. Its data is checked image by image
against that split (``LeakageGuard.check_out_split``), and only a guard made for an oracle row accepts it.

It starts from the run's DDPM (trained, or shipped, on the training domains) and trains ``steps`` more steps on
the training in-splits plus the held-out out-split, drawing every domain equally often (the out-split is a
fifth of a domain: drawn by size, its embedding would see a few hundred images in all). It is per trial (each
trial has its own out-split), cached like every helper model, and charged to the row that uses it. Our
choices (the protocol leaves them open): fine-tune rather than train anew (the row then differs from CDGA
only in what the generator knows), 1,500 steps at the DDPM's own learning rate, balanced domains.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Sequence

import torch

from domainfusion_bench.diffusion.conditions import LeakageGuard
from domainfusion_bench.diffusion.backbones import PixelDDPMBackbone
from domainfusion_bench.diffusion.trainer import (SplitImages, TrainedDDPM, _load_backbone, _train, ddpm_where,
                                                  training_indices)
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.protocol import split_indices

ORACLE_STEPS = 1500


def oracle_indices(dataset, train_envs: Sequence[int], test_envs: Sequence[int], trial_seed: int,
                   holdout_fraction: float, shared_trials: int, guard: LeakageGuard) -> dict[int, list[int]]:
    """Domain -> indices the oracle DDPM trains on: the training domains' (shared) in-splits, and each held-out
    domain's out-split under ``trial_seed``, checked by the guard."""
    out = {env: training_indices(len(dataset.envs[env]), env, trial_seed, holdout_fraction, shared_trials)
           for env in train_envs}
    for env in test_envs:
        held, _ = split_indices(len(dataset.envs[env]), trial_seed, env, holdout_fraction)
        out[env] = sorted(int(i) for i in held)
        guard.check_out_split(env, out[env], held)
    return dict(sorted(out.items()))


def train_oracle_ddpm(base: PixelDDPMBackbone, dataset, train_envs: Sequence[int], test_envs: Sequence[int], *,
                      trial_seed: int, holdout_fraction: float, config, store, device, steps: int = ORACLE_STEPS,
                      progress: bool = True, costs=None, made_by: str | None = None) -> TrainedDDPM:
    """The oracle DDPM for this trial (see the module docstring), from the store or fine-tuned from ``base``,
    the run's DDPM (whose training cost the caller has already been charged; it is copied, never changed)."""
    if steps < 1:
        raise DfbenchError(f"the oracle DDPM needs at least 1 fine-tuning step, got {steps}")
    train_envs, test_envs = sorted(int(e) for e in train_envs), sorted(int(e) for e in test_envs)
    if not test_envs:
        raise DfbenchError("an oracle DDPM needs a held-out domain to know: this run holds out none")
    guard = LeakageGuard(dataset.name, dataset.domains, test_envs, allow_condition=True, oracle_out_split=True)
    indices = oracle_indices(dataset, train_envs, test_envs, trial_seed, holdout_fraction, config.shared_trials, guard)
    tune = replace(config, steps=steps, shared_trials=0)  # per trial: the held-out out-split is this trial's
    where = ddpm_where(dataset, train_envs, trial_seed, holdout_fraction, tune)
    where["config"] = {**where["config"], "split": f"{where['config']['split']} + held-out out-split",
                       "oracle_of": base.key, "balanced_domains": True}
    key = store.key_of(store.identity("oracle_pixel_ddpm", **where, seen_envs=sorted(indices)))
    device = torch.device(device)

    def build():
        model = copy.deepcopy(base)
        model.seen_domains, model.key = frozenset(indices), key
        model.info = {**model.info, "oracle_of": base.key, "held_out_out_split": [dataset.domains[e] for e in test_envs],
                      "train_config": tune.to_json()}
        model.model.requires_grad_(True)  # loading freezes a model for sampling
        return model.to(device)

    def fit(backbone) -> dict:
        data = SplitImages(dataset, indices, tune.model.resolution)
        _train(backbone, dataset, sorted(indices), trial_seed, holdout_fraction, tune, device, progress, None,
               data=data, balanced=True)
        backbone.info["made_by"] = made_by
        return {k: backbone.info[k] for k in ("final_loss", "trained_on")}

    entry = store.get_or_train("oracle_pixel_ddpm", **where, seen_envs=sorted(indices), build=build, train=fit,
                               guard=guard, costs=costs, made_by=made_by, device=device,
                               cost_name="oracle_diffusion_train_seconds", save=lambda b, path: b.save(path),
                               load=_load_backbone)
    backbone = entry.module
    if backbone.key != key:
        raise DfbenchError(f"cached oracle DDPM at {entry.path} has key {backbone.key[:12]}, expected {key[:12]}; "
                           "delete the folder")
    backbone.restrict(test_envs, allow_condition=True, oracle_out_split=True)
    return TrainedDDPM(backbone, entry.key, entry.path, entry.train_seconds, entry.reused)
