"""DomainFusion's work, counted without running it: refreshes, generated images and denoiser evaluations
(NFEs) for a run length, next to what CDGA generates on the same data.

The paper states the schedule in epochs: a pool of a fraction of each training domain's in-split, every
T epochs each pool image gets N img2img candidates. Generated images therefore grow with the run length
while CDGA's are a fixed, offline set; the latent distillation adds one denoiser call per image it reads
at every step. ``DomainFusion`` charges exactly these counts (``tests/test_domainfusion.py`` checks them
against a real run's records), so the numbers here are the ones a run would record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


def img2img_nfe(sample_steps: int, strength: float, guidance_scale: float = 1.0) -> int:
    """Denoiser calls of one img2img generation: the last int(steps x strength) DDIM steps, 2 per step with CFG."""
    return min(int(sample_steps * strength), sample_steps) * (1 if guidance_scale == 1.0 else 2)


def ld_subset(batch: int, ld_batch: int) -> slice:
    """The images of a B-image step the distillation term reads: an even stride (every training domain is
    in it) when 0 < ld_batch < B, else all of them."""
    return slice(None, None, -(-batch // ld_batch)) if 0 < ld_batch < batch else slice(None)


def refresh_period(refresh_epochs: float, steps_per_epoch: float) -> int:
    """Steps between refreshes: T epochs of the real in-splits, at least one step."""
    return max(1, int(round(refresh_epochs * steps_per_epoch)))


def refreshes_in(steps: int, period: int) -> int:
    """Refreshes of a ``steps``-step run: ``on_step`` refreshes at steps period, 2 period, ... below ``steps``."""
    return max(0, steps - 1) // period


def pool_sizes(in_split_sizes: Sequence[int], pool_fraction: float) -> list[int]:
    return [max(1, math.ceil(pool_fraction * n)) for n in in_split_sizes]


@dataclass(frozen=True)
class Counts:
    refreshes: int
    images: int  # generated images
    generation_nfe: int
    distillation_nfe: int

    @property
    def nfe(self) -> int:
        """Total denoiser work."""
        return self.generation_nfe + self.distillation_nfe


def domainfusion_counts(hp: dict, steps: int, in_split_sizes: Sequence[int], *, distill: bool = True,
                        augment: bool = True) -> Counts:
    """What a DomainFusion run of ``steps`` steps with hyperparameters ``hp`` spends, for training domains
    whose in-splits have ``in_split_sizes`` images (steps per epoch as the trainer counts them)."""
    refreshes, images = 0, 0
    if augment:
        steps_per_epoch = min(n / hp["batch_size"] for n in in_split_sizes)
        refreshes = refreshes_in(steps, refresh_period(hp["df_refresh_epochs"], steps_per_epoch))
        # the first fill (one image per pool slot), then N candidates per slot at each refresh
        images = sum(pool_sizes(in_split_sizes, hp["df_pool_fraction"])) * (1 + int(hp["df_candidates"]) * refreshes)
    per_step = len(range(hp["batch_size"] * len(in_split_sizes))[ld_subset(hp["batch_size"] * len(in_split_sizes),
                                                                             int(hp["df_ld_batch"]))])
    return Counts(refreshes, images, images * img2img_nfe(hp["sample_steps"], hp["df_strength"]),
                  per_step * steps if distill else 0)


def cdga_counts(hp: dict, in_split_sizes: Sequence[int]) -> Counts:
    """CDGA's offline set: every in-split image toward every other training domain, ``cdga_k`` times
    (``hp``: CDGA's hyperparameters); it does not depend on the run length."""
    sources = [min(n, hp["cdga_max_sources"]) if hp["cdga_max_sources"] else n for n in in_split_sizes]
    images = sum(sources) * (len(in_split_sizes) - 1) * int(hp["cdga_k"])
    return Counts(0, images, images * img2img_nfe(hp["sample_steps"], hp["cdga_strength"], hp["cdga_guidance"]), 0)
