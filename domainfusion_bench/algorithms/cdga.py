"""CDGA: cross-domain generative augmentation (Hemati et al., 2023), and its oracle variant CDGA*.

Generation stage (``prepare``): for every in-split image of training domain i and every other training
domain j, K image-to-image generations toward (class y, domain j), optionally toward a mix of i and j
with a mixing weight drawn per image. Sources are the in-splits only (never the out-splits that
model selection validates on), and targets never include a held-out domain: the leakage guard
enforces both. Then ERM, where each training domain's loader draws real images and the images
generated *from* that domain, with a configurable synthetic fraction.

CDGA* is the clearly labelled oracle: it also generates toward the held-out domain(s) (their
description for text backbones, their label for the pixel DDPM, whose held-out embedding was never
trained and so carries no information). It never starts from, or trains the backbone on, held-out data.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from domainfusion_bench.algorithms.base import register_algorithm
from domainfusion_bench.algorithms.erm import ERM
from domainfusion_bench.data.loaders import SplitDataset
from domainfusion_bench.diffusion import DDIMSampler, GenerationCache, Request, SamplerConfig, build_backbone, mix
from domainfusion_bench.diffusion.backbones import resize
from domainfusion_bench.diffusion.factory import GENERATIONS_SUBDIR, MODELS_SUBDIR
from domainfusion_bench.diffusion.trainer import DEFAULT_STEPS, to_image_tensor
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.protocol import seed_hash, split_indices


def mixing_slots(n_real: int, n_synthetic: int, fraction: float) -> list[tuple[int, int]]:
    """(0, i) real / (1, i) synthetic slots such that a uniform draw is synthetic with probability
    ``fraction`` (up to rounding) and every real and synthetic item has a slot."""
    if n_synthetic == 0 or fraction <= 0:
        return [(0, i) for i in range(n_real)]
    if fraction >= 1 or n_real == 0:
        return [(1, i) for i in range(n_synthetic)]
    total = math.ceil(max(n_real / (1 - fraction), n_synthetic / fraction))
    n_syn_slots = round(total * fraction)
    n_real_slots = total - n_syn_slots
    return [(0, s % n_real) for s in range(n_real_slots)] + [(1, s % n_synthetic) for s in range(n_syn_slots)]


class MixedDataset(Dataset):
    """Real split + synthetic images (tensors in [0, 1]) through the split's transform, laid out by slots."""

    def __init__(self, real: Dataset, images: torch.Tensor, labels: torch.Tensor, slots, transform=None):
        self.real, self.images, self.labels, self.slots, self.transform = real, images, labels, slots, transform

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, k: int):
        source, i = self.slots[k]
        if source == 0:
            return self.real[i]
        x = self.images[i]
        if self.transform is not None:
            from torchvision.transforms import functional as TF

            x = self.transform(TF.to_pil_image(x))
        return x, int(self.labels[i])


def mixed_split(real: SplitDataset, images: torch.Tensor, labels: torch.Tensor, fraction: float, input_shape) -> Dataset:
    """A training split drawing synthetic images with probability ``fraction``. Keeps the trainer's
    tensor fast path (a transform-free SplitDataset over a TensorDataset) when the real split has it."""
    slots = mixing_slots(len(real), len(images), fraction)
    real_tensors = real.tensors() if isinstance(real, SplitDataset) else None
    if real_tensors is not None:
        rx, ry = real_tensors
        sx = resize(images.float(), tuple(input_shape[-2:])).to(rx.dtype) if len(images) else rx[:0]
        data = TensorDataset(torch.cat([rx, sx]), torch.cat([ry, labels.to(ry.dtype)]))
        indices = [i if s == 0 else len(rx) + i for s, i in slots]
        return SplitDataset(data, indices)
    return MixedDataset(real, images, labels, slots, getattr(real, "transform", None))


@register_algorithm("CDGA")
class CDGA(ERM):
    """Cross-domain generative augmentation: img2img toward other training domains, then ERM on real + synthetic."""

    NEEDS = "a diffusion backbone: pixel_ddpm (trained here on the training domains, offline) or sd:<checkpoint>"
    GENERATIVE = True
    ORACLE = False  # may condition on held-out domains (CDGA* only)

    @classmethod
    def hparam_space(cls, space, dataset):
        super().hparam_space(space, dataset)
        space.add("cdga_backbone", "pixel_ddpm")  # pixel_ddpm | sd:<folder or hub id> | sd:tiny
        space.add("cdga_k", 1)  # generations per (image, target domain)
        space.add("cdga_strength", 0.5, lambda r: r.uniform(0.3, 0.8))
        # 1 = no classifier-free guidance: one denoiser call per step, and on the small pixel DDPM it keeps
        # the class readable better than 2+ (which restyles harder)
        space.add("cdga_guidance", 1.0, lambda r: float(r.choice([1.0, 2.0, 3.0])))
        space.add("cdga_interpolation", True, lambda r: bool(r.choice([True, False])))
        space.add("cdga_synthetic_fraction", 0.5, lambda r: r.uniform(0.25, 0.75))
        space.add("cdga_ddpm_steps", DEFAULT_STEPS)  # training steps of the pixel DDPM (cached per training domains)
        space.add("cdga_sample_steps", 10)  # DDIM steps of a full trajectory (img2img runs strength x this)
        space.add("cdga_gen_batch_size", 128)
        # 0 = every in-split image is a source (the paper); N = the first N of each domain's (shuffled)
        # in-split, for cheap smoke runs and tests
        space.add("cdga_max_sources", 0)

    def target_domains(self, source: int, context) -> list[int]:
        targets = [j for j in context.train_envs if j != source]
        if self.ORACLE:
            targets += list(context.test_envs)
        return targets

    def prepare(self, context: Any):
        # generation must not move the run's random streams: a run that finds everything in the cache
        # trains exactly like the run that made it
        devices = [context.device] if torch.device(context.device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._generate(context)

    def _generate(self, context: Any):
        hp, ds, args = self.hparams, context.dataset, context.args
        made_by = str(Path(args.output_dir).resolve())
        if hp["cdga_k"] < 0 or hp["cdga_max_sources"] < 0 or not 0 <= hp["cdga_synthetic_fraction"] <= 1:
            raise DfbenchError("CDGA needs cdga_k >= 0, cdga_max_sources >= 0 and 0 <= cdga_synthetic_fraction <= 1")
        backbone = build_backbone(
            hp["cdga_backbone"], dataset=ds, train_envs=context.train_envs, test_envs=context.test_envs,
            cache_dir=context.cache_dir / MODELS_SUBDIR, device=context.device, trial_seed=args.trial_seed,
            holdout_fraction=args.holdout_fraction, costs=context.costs, ddpm_steps=hp["cdga_ddpm_steps"],
            oracle=self.ORACLE, made_by=made_by,
        )
        sampler = DDIMSampler(backbone, SamplerConfig(steps=hp["cdga_sample_steps"], guidance_scale=hp["cdga_guidance"],
                                                      batch_size=hp["cdga_gen_batch_size"]))
        cache = GenerationCache(context.cache_dir / GENERATIONS_SUBDIR)
        channels, n_domains = int(ds.input_shape[0]), len(ds.domains)
        splits, summary = [], []
        for split, env in zip(context.train_splits, context.train_envs):
            _, allowed = split_indices(len(ds.envs[env]), args.trial_seed, env, args.holdout_fraction)
            leaked = set(split.indices) - set(allowed)
            if leaked:
                raise DfbenchError(f"CDGA: {len(leaked)} source images of domain {ds.domains[env]} are not in its in-split")
            requests = []
            sources = split.indices[:hp["cdga_max_sources"]] if hp["cdga_max_sources"] else split.indices
            for idx in sources:
                x, y = split.dataset[idx]
                source = to_image_tensor(x, channels, backbone.resolution)
                for j in self.target_domains(env, context):
                    for r in range(hp["cdga_k"]):
                        amount = 1.0
                        if hp["cdga_interpolation"]:
                            amount = np.random.RandomState(seed_hash("CDGA-mix", args.trial_seed, env, idx, j, r)).uniform()
                        requests.append(Request(
                            class_id=int(y), domains=mix(n_domains, env, j, amount),
                            seed=seed_hash("CDGA", args.trial_seed, env, idx, j, r), source=source, source_domain=env,
                            source_ref={"dataset": ds.name, "domain": ds.domains[env], "index": int(idx)},
                        ))
            images, stats = cache.img2img(sampler, requests, hp["cdga_strength"], made_by=made_by,
                                          desc=f"CDGA from {ds.domains[env]}")
            stats.charge(context.costs)
            labels = torch.tensor([r.class_id for r in requests], dtype=torch.long)
            splits.append(mixed_split(split, images, labels, hp["cdga_synthetic_fraction"], ds.input_shape))
            summary.append(f"{ds.domains[env]}: {len(split)} real + {len(images)} synthetic "
                           f"({stats.made_images} made, {stats.reused_images} reused)")
        print(f"{type(self).registered_name}: backbone {backbone.kind} {backbone.key[:12]}; " + "; ".join(summary))
        return splits


@register_algorithm("CDGA*")
class CDGAOracle(CDGA):
    """ORACLE (not a DG result): CDGA that also generates toward the held-out domain's condition."""

    NEEDS = CDGA.NEEDS + "; uses the held-out domain's description/label (oracle)"
    ORACLE = True
