"""DomainFusion (Huang et al., ECCV 2024): latent distillation + online lightweight augmentation.

One frozen, class-conditioned diffusion model (the run's shared backbone: the pixel DDPM trained on the
training domains, or Stable Diffusion) serves two parts, each switchable for the paper's ablation rows.

(a) Latent distillation (the paper's "gradient score distillation"). For a training image x0 in [0, 1]
with label y0, let p = p_theta(y0 | x0) be the classifier's true-class probability and
x(theta) = p * x0. Encode z = E(x(theta)) (differentiably: identity up to scale for the pixel DDPM,
the VAE for Stable Diffusion), draw t ~ U[t_min T, t_max T] and eps ~ N(0, I), noise
z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps, and ask the frozen denoiser for eps_hat(z_t, t, y0) without
gradient (class y0, no domain condition). The update is the score-distillation gradient

    grad_theta L_LD = E[ w(t) (eps_hat - eps) . dz/dtheta ]        (the denoiser Jacobian dropped, as SDS)

computed through the surrogate L_LD = mean( stopgrad(w(t) (eps_hat - eps)) * z ), the mean over the
batch and every element of z (so lambda_LD does not depend on the latent size). Total loss:
CE + lambda_LD * L_LD. The paper states neither w(t) nor the t range; ours are DreamFusion's SDS choices,
w(t) = 1 - abar_t and t in [0.02 T, 0.98 T] (``df_w``, ``df_t_min``, ``df_t_max``). A low-confidence
prediction darkens x(theta), the denoiser must rebuild much of the image, and the large residual
pushes theta; the term fades as p -> 1, so ``loss_ld`` and the mean true-class probability ``p_true``
are in every record.

(b) Online lightweight augmentation. A synthetic pool of ``df_pool_fraction`` of each training domain's
in-split (the first images of the shuffled split), first filled by one img2img pass from those real
images toward another training domain or a mix (``df_target``). Every ``df_refresh_epochs`` epochs (the
paper's period T, in epochs of the real in-splits) each pool image gets ``df_candidates`` img2img
candidates from itself (same class, toward another training domain or a mix, strength ``df_strength``),
decomposed into content and style of frozen features; as the paper, the candidate with the most similar
content (c*) and the one with the most different style (s*) are recombined into the new pool image
(``networks.style_content``: the selection reads deep features, the recombination is MODE's pixel-space
amplitude/phase swap, ``df_style_weight`` of s*'s amplitude, because no decoder maps the frozen features
back to pixels). ``metric_df_recombined`` is the share of pool images where c* != s*. Training batches draw
pool images with probability ``df_synthetic_fraction``. Every candidate is generated through the
generation cache (a relaunch reuses them) and counted in ``cost_generated_images`` / ``cost_nfe``;
``metric_df_generated_vs_cdga`` is the ratio to the images CDGA would generate on the same data
(``domainfusion_schedule`` counts both for any run length). The pool and its refresh count are part of
the resume state, so a run killed after a refresh resumes with that pool.

Cost: the distillation calls the denoiser once per image it reads at every step; those calls are charged
as ``cost_ld_nfe`` beside the generation's ``cost_nfe``. ``refresh_pool`` is the refresh a caller (the
oracle-guidance rounds) can reuse: candidates in, pool images out.

Never the held-out domain: the backbone is restricted to the run's held-out domains, sources are
training-domain in-split images (or pool images made from them), targets are training domains only,
and the distillation condition has no domain at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from domainfusion_bench.algorithms.base import register_algorithm
from domainfusion_bench.algorithms.domainfusion_schedule import cdga_counts, ld_subset, refresh_period
from domainfusion_bench.algorithms.generative import GenerativeAlgorithm
from domainfusion_bench.algorithms.validity import judge_generation
from domainfusion_bench.data.pools import mixed_split
from domainfusion_bench.diffusion import Request, mix
from domainfusion_bench.diffusion.backbones import Backbone, resize
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.hparams import HParamSpace
from domainfusion_bench.networks.style_content import StyleContentNet, content_style_choice, recombine
from domainfusion_bench.protocol import seed_hash, split_indices

SDS_WEIGHTS = ("1-abar", "1", "snr")
TARGETS = ("other", "mix")


def sds_weight(abar: torch.Tensor, kind: str) -> torch.Tensor:
    """w(t) from alpha-bar_t: "1-abar" (DreamFusion's SDS), "1" (flat), "snr" = abar / (1 - abar)."""
    if kind == "1-abar":
        return 1 - abar
    if kind == "1":
        return torch.ones_like(abar)
    if kind == "snr":
        return abar / (1 - abar)
    raise DfbenchError(f"df_w must be one of {', '.join(SDS_WEIGHTS)}, got {kind!r}")


@dataclass
class Distillation:
    """One latent-distillation evaluation: the surrogate loss and what it was made of (for tests and logs)."""

    loss: torch.Tensor  # scalar surrogate; its gradient is the SDS update
    z: torch.Tensor  # encode(p * x0), with grad
    t: torch.Tensor  # [B] timesteps
    noise: torch.Tensor  # eps
    eps_hat: torch.Tensor  # frozen denoiser output (no grad)
    weight: torch.Tensor  # w(t), [B, 1, ...]


def timestep_range(num_train_timesteps: int, t_min: float, t_max: float) -> tuple[int, int]:
    """Integer timesteps [lo, hi] (inclusive) for fractions t_min <= t_max of T."""
    if not 0.0 <= t_min <= t_max <= 1.0:
        raise DfbenchError(f"DomainFusion needs 0 <= df_t_min <= df_t_max <= 1 (fractions of T), got {t_min}, {t_max}")
    last = num_train_timesteps - 1
    return min(last, int(round(t_min * num_train_timesteps))), min(last, int(round(t_max * num_train_timesteps)))


def latent_distillation(backbone: Backbone, x01: torch.Tensor, p_true: torch.Tensor, class_ids: torch.Tensor, *,
                        t_min: float = 0.02, t_max: float = 0.98, weighting: str = "1-abar",
                        generator: torch.Generator | None = None) -> Distillation:
    """L_LD for images ``x01`` [B, C, H, W] in [0, 1] (no grad needed) and true-class probabilities
    ``p_true`` [B] (with grad to theta). ``generator`` draws t and eps (default: the global streams)."""
    b = len(x01)
    z = backbone.encode(p_true.float().view(-1, *[1] * (x01.dim() - 1)) * x01.float())
    lo, hi = timestep_range(backbone.num_train_timesteps, t_min, t_max)
    gen_device = generator.device if generator is not None else z.device
    t = torch.randint(lo, hi + 1, (b,), generator=generator, device=gen_device).to(z.device)
    noise = torch.randn(z.shape, generator=generator, device=gen_device).to(z.device)
    with torch.no_grad():
        abar = backbone.alphas_cumprod.to(z.device)[t].view(-1, *[1] * (z.dim() - 1))
        z_t = abar.sqrt() * z.detach().float() + (1 - abar).sqrt() * noise
        cond = backbone.condition(class_ids.detach().cpu(), None)  # class y0, no domain
        eps_hat = backbone.eps(z_t, t, cond).float()
        weight = sds_weight(abar, weighting)
        residual = weight * (eps_hat - noise)
    loss = (residual * z.float()).mean()
    return Distillation(loss, z, t, noise, eps_hat, weight)


@register_algorithm("DomainFusion")
class DomainFusion(GenerativeAlgorithm):
    """CE + latent distillation from a frozen diffusion model + an online, style-selected synthetic pool."""

    NEEDS = "a diffusion backbone: pixel_ddpm (trained here on the training domains, offline) or sd:<checkpoint>"
    DISTILL = True  # (a) latent distillation
    DDP_EXACT = False  # the distillation sub-sample (df_ld_batch) is taken per rank, its noise drawn per rank
    AUGMENT = True  # (b) online lightweight augmentation
    # a small pool refreshed every 2 steps of a batch-8 smoke run (45 steps per epoch on DigitStyles)
    SMOKE_HPARAMS = {**GenerativeAlgorithm.SMOKE_HPARAMS, "df_pool_fraction": 0.02, "df_refresh_epochs": 0.05}

    @classmethod
    def hparam_space(cls, space: HParamSpace, dataset: type) -> None:
        super().hparam_space(space, dataset)
        if cls.DISTILL:
            space.add("df_ld_weight", 1.0, lambda r: float(10 ** r.uniform(-1, 1)))  # lambda_LD
            # ours (the paper states neither): SDS's t range, as fractions of T, and SDS's w(t)
            space.add("df_t_min", 0.02)
            space.add("df_t_max", 0.98)
            space.add("df_w", "1-abar", lambda r: str(r.choice(list(SDS_WEIGHTS))))
            # images per step the distillation term sees: an even stride through the minibatch, so every
            # training domain is in it (0 = all, the paper). Ours, for speed: the term costs a denoiser pass
            # per image, more than the classifier's own step on a small CNN.
            space.add("df_ld_batch", 0)
        if cls.AUGMENT:
            # the paper's form (a pool fraction, a period T in epochs, N candidates); the values are ours. On
            # DigitStyles at batch 32: 7.5% of CDGA's images at the demo's 301 steps (1 refresh), 148% at
            # 5001 (29 refreshes); domainfusion_schedule counts any length
            space.add("df_pool_fraction", 0.05, lambda r: float(r.choice([0.02, 0.05, 0.1])))
            space.add("df_refresh_epochs", 15.0, lambda r: float(r.choice([5.0, 10.0, 15.0, 20.0])))
            space.add("df_candidates", 2, lambda r: int(r.choice([2, 3, 4])))  # c* and s* are chosen among them
            space.add("df_strength", 0.5, lambda r: float(r.uniform(0.3, 0.7)))
            space.add("df_target", "mix", lambda r: str(r.choice(list(TARGETS))))
            space.add("df_synthetic_fraction", 0.25, lambda r: float(r.uniform(0.1, 0.5)))
            # share of s*'s Fourier amplitude in the recombined image (1: s*'s style on c*'s content)
            space.add("df_style_weight", 1.0, lambda r: float(r.uniform(0.5, 1.0)))
            space.add("df_style_net", "auto")  # auto | imagenet | featurizer (see networks/style_content.py)

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self._diffusion: Backbone | None = None
        self._pools: list[dict[str, torch.Tensor]] = []  # per training domain: images (uint8), labels, sources
        self._refreshes = 0
        self._generated = 0
        self._recombined = 0.0  # share of pool images whose last refresh had c* != s*

    # --- setup -------------------------------------------------------------------------------------
    def check_hparams(self) -> None:
        hp = self.hparams
        if self.DISTILL:
            timestep_range(1000, hp["df_t_min"], hp["df_t_max"])
            sds_weight(torch.zeros(1), hp["df_w"])
        if self.AUGMENT:
            if not 0 < hp["df_pool_fraction"] <= 1 or not 0 <= hp["df_synthetic_fraction"] <= 1:
                raise DfbenchError("DomainFusion needs 0 < df_pool_fraction <= 1 and 0 <= df_synthetic_fraction <= 1")
            if hp["df_candidates"] < 2 or hp["df_refresh_epochs"] <= 0 or not 0 <= hp["df_style_weight"] <= 1:
                raise DfbenchError("DomainFusion needs df_candidates >= 2 (content and style each choose among "
                                   "them), df_refresh_epochs > 0 and 0 <= df_style_weight <= 1")
            if hp["df_target"] not in TARGETS:
                raise DfbenchError(f"df_target must be one of {', '.join(TARGETS)}, got {hp['df_target']!r}")

    def generate(self, context: Any):
        """The pre-stage (run by ``GenerativeAlgorithm.prepare`` with the run's random streams set aside):
        load the shared backbone, fill the pool, return the mixed training splits."""
        self.check_hparams()
        if not (self.DISTILL or self.AUGMENT):
            return None
        self._diffusion = self.backbone(context)
        if not self.AUGMENT:
            return None
        if len(context.train_envs) < 2:
            raise DfbenchError("DomainFusion's online augmentation restyles toward another training domain: "
                               "it needs at least two training domains (or use DomainFusion-LD)")
        self._fill_pool(context)
        self._record_metrics(context)
        return self._splits(context)

    # --- (a) latent distillation -----------------------------------------------------------------
    def loss(self, minibatches):
        x = torch.cat([x for x, _ in minibatches])
        y = torch.cat([y for _, y in minibatches])
        logits = self.predict(x)
        loss = F.cross_entropy(logits, y)
        p_true = torch.softmax(logits.float(), dim=1).gather(1, y.view(-1, 1)).squeeze(1)
        terms = {"p_true": p_true.mean().detach()}
        if self.DISTILL:
            if self._diffusion is None:
                raise DfbenchError("DomainFusion.prepare(context) must run before training (it loads the diffusion model)")
            hp = self.hparams
            sub = ld_subset(len(x), int(hp["df_ld_batch"]))
            ld = latent_distillation(self._diffusion, self._context.dataset.to_unit(x[sub]).detach(), p_true[sub],
                                     y[sub], t_min=hp["df_t_min"], t_max=hp["df_t_max"], weighting=hp["df_w"])
            self._context.costs.add("ld_nfe", len(ld.t))  # one denoiser call per image read
            loss = loss + hp["df_ld_weight"] * ld.loss
            terms["loss_ld"] = ld.loss.detach()
        return loss, terms

    # --- (b) online lightweight augmentation -----------------------------------------------------
    def _target(self, env: int, train_envs, n_domains: int, key: tuple) -> dict[int, float]:
        """The domain condition of one generation: another training domain, or a mix of the source
        and another training domain (a weight drawn per generation), never a held-out domain."""
        rng = np.random.RandomState(seed_hash("DomainFusion-target", *key))
        others = [j for j in train_envs if j != env]
        j = int(others[rng.randint(len(others))])
        if self.hparams["df_target"] == "other":
            return {j: 1.0}
        return mix(n_domains, env, j, float(rng.uniform()))

    def _requests(self, context, env: int, sources: torch.Tensor, slots, labels, round_: int, n: int,
                  source_refs) -> list[Request]:
        trial = context.args.trial_seed
        requests = []
        for k, slot in enumerate(slots):
            for c in range(n):
                key = (trial, env, int(slot), round_, c)
                requests.append(Request(
                    class_id=int(labels[k]), domains=self._target(env, context.train_envs, len(context.dataset.domains), key),
                    seed=seed_hash("DomainFusion", *key), source=sources[k], source_domain=env,
                    source_ref={**source_refs[k], "round": round_},
                ))
        return requests

    def _img2img(self, context, requests, desc: str) -> torch.Tensor:
        """Images for ``requests`` through the generation cache, as uint8 at the classifier's input size."""
        sampler = self.sampler(self._diffusion, self.guidance_terms(context, self._diffusion))
        images, stats = context.generations.img2img(sampler, requests, self.hparams["df_strength"],
                                                    made_by=context.made_by, desc=desc, uint8=True)
        stats.charge(context.costs)
        self._generated += len(requests)
        size = tuple(self.input_shape[-2:])
        if tuple(images.shape[-2:]) != size:  # e.g. a 512 px Stable Diffusion image for a 224 px classifier
            images = self.to_uint8(resize(images.float() / 255, size).clamp(0, 1))
        return images

    def _fill_pool(self, context) -> None:
        ds, args = context.dataset, context.args
        channels = int(ds.input_shape[0])
        self._pools = []
        for split, env in zip(context.train_splits, context.train_envs):
            _, allowed = split_indices(len(ds.envs[env]), args.trial_seed, env, args.holdout_fraction)
            size = max(1, math.ceil(self.hparams["df_pool_fraction"] * len(split)))
            chosen = list(split.indices[:size])
            if set(chosen) - set(allowed):
                raise DfbenchError(f"DomainFusion: pool sources of domain {ds.domains[env]} are not all in its in-split")
            items = [ds.envs[env][i] for i in chosen]
            sources = torch.stack([self.source_image(context, x, self._diffusion) for x, _ in items])
            labels = torch.tensor([int(y) for _, y in items], dtype=torch.long)
            refs = [{"dataset": ds.name, "domain": ds.domains[env], "index": int(i)} for i in chosen]
            requests = self._requests(context, env, sources, range(size), labels, 0, 1, refs)
            images = self._img2img(context, requests, f"DomainFusion pool from {ds.domains[env]}")
            if images.shape[1] != channels:
                raise DfbenchError(f"the backbone made {images.shape[1]}-channel images for {channels}-channel {ds.name}")
            self.after_generation(context, images, labels, env, "pool")
            self.keep_preview(context, images, env, requests=requests, strength=self.hparams["df_strength"], stage="pool",
                              sampler=self.sampler(self._diffusion, self.guidance_terms(context, self._diffusion)))
            self._pools.append({"images": images, "labels": labels, "sources": torch.tensor(chosen, dtype=torch.long)})

    def refresh_period(self, context) -> int:
        return refresh_period(self.hparams["df_refresh_epochs"], context.steps_per_epoch)

    def on_step(self, step: int, context: Any):
        if not self.AUGMENT or step == 0 or self._refreshes >= step // self.refresh_period(context):
            return None
        devices = [context.device] if torch.device(context.device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            self.refresh(context)
        self._record_metrics(context)
        return self._splits(context)

    def refresh(self, context) -> None:
        """One refresh of every pool image: N img2img candidates from it, recombined into one (``refresh_pool``)."""
        hp, ds = self.hparams, context.dataset
        round_ = self._refreshes + 1
        n = int(hp["df_candidates"])
        device = torch.device(context.device)
        net = StyleContentNet.choose(hp["df_style_net"], self.featurizer, ds.from_unit).to(device)
        recombined = 0
        for env, pool in zip(context.train_envs, self._pools):
            current = pool["images"].float() / 255
            refs = [{"dataset": ds.name, "domain": ds.domains[env], "index": int(i), "pool_slot": k}
                    for k, i in enumerate(pool["sources"].tolist())]
            requests = self._requests(context, env, resize(current, self._diffusion.resolution),
                                      range(len(current)), pool["labels"], round_, n, refs)
            candidates = self._img2img(context, requests, f"DomainFusion refresh {round_} of {ds.domains[env]}")
            if hp.get("og_measure"):  # the sampler's own output, before recombination (oracle guidance acts here)
                rate = judge_generation(self, context, candidates, pool["labels"].repeat_interleave(n), env,
                                        f"candidates{round_}")
                context.metrics.set("invalid_rate_candidates", rate)
            grid = candidates.view(len(current), n, *candidates.shape[1:])
            pool["images"], content, style = self.refresh_pool(pool["images"], grid, net, device)
            recombined += int((content != style).sum())
            self.after_generation(context, pool["images"], pool["labels"], env, f"refresh{round_}")
            context.heartbeat()
        self._refreshes = round_
        self._recombined = recombined / max(1, sum(len(pool["images"]) for pool in self._pools))

    def refresh_pool(self, images: torch.Tensor, candidates: torch.Tensor, net: StyleContentNet,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """New pool images (uint8 [P, C, H, W]) from the current ones and their candidates (uint8
        [P, N, C, H, W]): c* (most similar content) and s* (most different style) by ``net``'s frozen
        features, recombined; also returns the indices (c*, s*)."""
        current, grid = images.float() / 255, candidates.float() / 255
        with torch.no_grad():
            ref = net(current.to(device))
            feats = net(grid.flatten(0, 1).to(device))
        content, style = (i.cpu() for i in content_style_choice(ref, feats.view(*grid.shape[:2], *feats.shape[1:])))
        rows = torch.arange(len(grid))
        new = recombine(grid[rows, content], grid[rows, style], self.hparams["df_style_weight"])
        return self.to_uint8(new), content, style

    def _splits(self, context):
        return [mixed_split(split, pool["images"], pool["labels"], self.hparams["df_synthetic_fraction"])
                for split, pool in zip(context.train_splits, self._pools)]

    def cdga_images(self, context) -> int:
        """Images CDGA (at its defaults) would generate on the same data."""
        from domainfusion_bench.algorithms.cdga import CDGA

        space = HParamSpace()
        CDGA.hparam_space(space, type(context.dataset))
        return cdga_counts(space.defaults(), [len(s) for s in context.train_splits]).images

    def _record_metrics(self, context) -> None:
        context.metrics.set("df_generated_vs_cdga", self._generated / max(1, self.cdga_images(context)))
        context.metrics.set("df_refreshes", self._refreshes)
        context.metrics.set("df_recombined", self._recombined)

    # --- resume --------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"pools": [{k: v.clone() for k, v in pool.items()} for pool in self._pools],
                "refreshes": self._refreshes, "generated": self._generated, "recombined": self._recombined}

    def load_extra_state(self, state: dict[str, Any], context: Any):
        self._pools = [{k: v.cpu() for k, v in pool.items()} for pool in state["pools"]]
        self._refreshes, self._generated = int(state["refreshes"]), int(state["generated"])
        self._recombined = float(state["recombined"])
        if not self.AUGMENT:
            return None
        self._record_metrics(context)
        return self._splits(context)


@register_algorithm("DomainFusion-LD")
class DomainFusionLD(DomainFusion):
    """Ablation: CE + latent distillation only (no synthetic pool)."""

    AUGMENT = False
    SMOKE_HPARAMS = GenerativeAlgorithm.SMOKE_HPARAMS


@register_algorithm("DomainFusion-Aug")
class DomainFusionAug(DomainFusion):
    """Ablation: CE + online lightweight augmentation only (no distillation). The CE-only row of the
    paper's ablation table is ERM."""

    DISTILL = False
