"""What every generative method shares: one diffusion backbone per (training domains, trial), a DDIM
sampler, hooks for guidance terms and for judging what was generated, and a generation stage that
leaves the run's random streams untouched (a run that finds everything cached trains exactly like the
run that made it).

A method subclasses ``GenerativeAlgorithm`` and implements ``generate(context)``, returning one training
split per training domain (usually ``data.pools.mixed_split`` of the real split and its uint8 images).
The shared hyperparameters keep the pixel DDPM shared: every method with the same ``ddpm_steps`` on the
same training domains and trial loads the one model the first of them trained.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from domainfusion_bench.algorithms.erm import ERM
from domainfusion_bench.algorithms.previews import PREVIEW_IMAGES, PreviewStrip, keep_preview
from domainfusion_bench.algorithms.validity import judge_generation, validity_judge, judge_hparams
from domainfusion_bench.diffusion import DDIMSampler, LeakageGuard, SamplerConfig, build_backbone
from domainfusion_bench.diffusion.factory import oracle_pixel_ddpm
from domainfusion_bench.diffusion.oracle_ddpm import ORACLE_STEPS
from domainfusion_bench.diffusion.backbones import Backbone, BackboneSpec, resize
from domainfusion_bench.diffusion.cache import quantize
from domainfusion_bench.diffusion.samplers import GuidanceTerm
from domainfusion_bench.diffusion.trainer import DEFAULT_STEPS, default_config


class GenerativeAlgorithm(ERM):
    """ERM on data that a diffusion stage made; subclasses implement ``generate``."""

    NEEDS = "a diffusion backbone: pixel_ddpm (trained here on the training domains, offline) or sd:<checkpoint>"
    GENERATIVE = True
    ORACLE = False  # may condition on held-out domains (oracle rows only, e.g. CDGA*)
    FEW_SHOT_TARGET = 0  # >0: the labelled few-shot-target track (not DG) may use that many unlabelled held-out images
    SMOKE_HPARAMS = {"ddpm_steps": 2, "sample_steps": 2, "og_judge_steps": 5}

    @classmethod
    def hparam_space(cls, space, dataset):
        super().hparam_space(space, dataset)
        space.add("diffusion_backbone", "pixel_ddpm")  # pixel_ddpm | sd:<folder or hub id> | sd:tiny
        space.add("ddpm_steps", DEFAULT_STEPS)  # training steps of the shared pixel DDPM (cached per training domains)
        space.add("sample_steps", 10)  # DDIM steps of a full trajectory (img2img runs strength x this)
        judge_hparams(space)  # og_measure: every generation judged by the validity judge
        if cls.ORACLE:  # fine-tuning steps of the oracle DDPM (diffusion/oracle_ddpm.py; pixel DDPM only)
            space.add("oracle_ddpm_steps", ORACLE_STEPS)

    # --- shared parts -----------------------------------------------------------------------------
    def backbone(self, context, oracle: bool | None = None) -> Backbone:
        """The run's diffusion backbone (trained on the training domains' in-splits once, then cached)."""
        oracle = self.ORACLE if oracle is None else oracle
        cached = self.__dict__.setdefault("_backbones", {})  # one dict: the oracle's build fills the base's entry
        if oracle not in cached:
            hp, args = self.hparams, context.args
            common = dict(dataset=context.dataset, train_envs=context.train_envs, test_envs=context.test_envs,
                          store=context.models, device=context.device, trial_seed=args.trial_seed,
                          holdout_fraction=args.holdout_fraction, costs=context.costs, ddpm_steps=hp["ddpm_steps"],
                          made_by=context.made_by)
            if oracle and BackboneSpec.parse(hp["diffusion_backbone"]).kind == "pixel_ddpm":
                # the run's DDPM (charged once, shared with the row's DG generations) fine-tuned to know the target
                cached[oracle] = oracle_pixel_ddpm(self.backbone(context, oracle=False), **common,
                                                   oracle_ddpm_steps=hp["oracle_ddpm_steps"])
            else:
                cached[oracle] = build_backbone(hp["diffusion_backbone"], **common, oracle=oracle,
                                                few_shot_target=self.few_shot_target())
        return cached[oracle]

    def few_shot_target(self) -> int:
        return self.FEW_SHOT_TARGET

    def sampler(self, backbone: Backbone, guidance: Sequence[GuidanceTerm] | None = None, **config) -> DDIMSampler:
        """A DDIM sampler with the run's settings; ``config`` overrides SamplerConfig fields. The batch size is
        a speed setting of the run (``--gen_batch_size``), not a hyperparameter: it never changes results."""
        context = getattr(self, "_context", None)
        batch = getattr(getattr(context, "args", None), "gen_batch_size", None)
        cuda = context is not None and torch.device(context.device).type == "cuda"
        settings = {"steps": self.hparams["sample_steps"], "batch_size": batch or (512 if cuda else 128), **config}
        return DDIMSampler(backbone, SamplerConfig(**settings), guidance=list(guidance or ()))

    def source_image(self, context, x, backbone: Backbone) -> torch.Tensor:
        """A raw dataset item as a [C, H, W] image in [0, 1] at the backbone's resolution."""
        return resize(context.dataset.item_to_unit(x).unsqueeze(0), backbone.resolution).squeeze(0)

    # --- hooks --------------------------------------------------------------------------------------
    def guidance_terms(self, context, backbone: Backbone) -> list[GuidanceTerm]:
        """Guidance added to every generation of this method (oracle guidance variants add theirs)."""
        return []

    def after_generation(self, context, images: torch.Tensor, labels: torch.Tensor, env: int,
                         round_name: str = "base") -> None:
        """Called with each batch of generated images (uint8 [N, C, H, W]) made for training domain ``env``.
        Keeps a few for the run's previews; validity-measuring variants judge them here."""
        if not len(images):
            return
        previews = getattr(context, "previews", None)
        domain = context.dataset.domains[env]
        if previews is not None and not any(p.stage == round_name and (p.domain == domain or p.kind != "unknown")
                                            for p in previews):
            # a method that does not call keep_preview still shows something (without what it is)
            previews.append(PreviewStrip(images[:PREVIEW_IMAGES].cpu(), round_name, domain))
        if self.hparams.get("og_measure"):
            judge_generation(self, context, images, labels, env, round_name)

    # --- previews (the HTML leaderboard's "Generated images") -----------------------------------------
    keep_preview = keep_preview

    def preview_variants(self, context, sampler, requests, strength):
        """Draws of the preview's requests to show side by side: ``[(og label, uint8 images or None for the
        training images, guidance term names)]``; oracle-guided rows redraw them unguided and per round.
        Plain methods: none (the preview is the training images)."""
        return []

    # --- the generation stage -----------------------------------------------------------------------
    def prepare(self, context: Any):
        self._context = context
        devices = [context.device] if torch.device(context.device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            self.while_the_ddpm_trains(context)
            return self.generate(context)

    def while_the_ddpm_trains(self, context: Any) -> None:
        """When another run is training the shared pixel DDPM, train the helper model that does not need it
        (the validity judge) now, rather than wait for the DDPM and then for the judge in turn: two runs
        that start together then train the two in parallel."""
        spec = str(self.hparams.get("diffusion_backbone", ""))
        if not self.hparams.get("og_measure") or spec != "pixel_ddpm" or not context.models.training_elsewhere("pixel_ddpm"):
            return
        ds = context.dataset
        validity_judge(context, default_config(ds).model.resolution, self.hparams,  # charged when it is used
                          guard=LeakageGuard(ds.name, ds.domains, context.test_envs), charge=False)

    def generate(self, context: Any):
        raise NotImplementedError(f"{type(self).__name__} must implement generate(context)")

    @staticmethod
    def to_uint8(images: torch.Tensor) -> torch.Tensor:
        return images if images.dtype == torch.uint8 else quantize(images)
