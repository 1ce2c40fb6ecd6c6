"""Oracle-assisted guidance (Naderiparizi et al., ICML 2024) as a generation option of any generative method.

``OracleGuided`` is a mixin for ``GenerativeAlgorithm`` subclasses (``class CDGAOG(OracleGuided, CDGA)``):

- the validity judge is a small CNN trained on the real training-domain in-splits only (a cached helper model;
  its accuracy on the training-domain out-splits is recorded as ``metric_judge_val_acc``). A generated
  image is invalid when the judge's probability of its intended class is below ``og_threshold``.
- ``guidance_terms`` runs ``og_rounds`` rounds (``diffusion.oracle_guidance.run_rounds``): draw
  ``og_samples_per_round`` images the way the method generates (``og_draw``), label them with the judge,
  train a time- and class-conditioned validity classifier C_k(z_t, t, y) with the class-prior-weighted
  BCE, stack. With ``og_distill`` the stack is distilled into one classifier; the method's generation is
  then guided by that one network (one extra evaluation per step) instead of the stack (K of them).
- ``after_generation`` judges what the method generated for training: ``metric_invalid_rate``.
  The rounds record ``metric_invalid_rate_base``, ``_round1``.. and ``_distilled``.

Every network is a cached helper model keyed by everything its training data depends on (backbone,
the method's generation settings, the judge, the previous rounds): a rerun draws and trains nothing.
Costs: ``validity_judge_train_seconds``, ``og_round_classifier_train_seconds``,
``og_distilled_classifier_train_seconds`` (each also ``reused_...`` when cached), ``og_samples_drawn``
(images drawn for labelling, also counted in ``generated_images``/``nfe``/``generation_seconds``) and
``og_guidance_evals`` (classifier gradient evaluations spent while drawing).

Our choices (the paper is about trajectories, not images of a DG benchmark): the judge is a classifier
of the intended class (not a hand-written constraint); the validity classifier sees the denoiser's input
z_t and the class y, so one network serves all classes; rounds draw with the method's own generation
(CDGA: img2img from in-split sources toward other training domains), so C learns the failures of the
samples that will be used. Three more, each a hyperparameter, because with a good generator a draw is
~97% valid and the paper's recipe as written then learns nothing (measured on DigitStyles: C = 0.98 for
every image and class, |grad log C| ~ 1e-7, guided images equal to unguided ones to 1e-5 of a grey level):
``og_counterfactual`` trains C on every (drawn image, class) pair the judge labelled, not only the intended
class (many invalid pairs from one draw); ``og_classifier_init: judge`` starts C from the judge's
weights with a zero-initialised time embedding (from scratch, 150 steps stay at chance on the digits);
the alpha-weighting is applied as C's fixed prior offset (``diffusion.oracle_guidance.training``); and
``og_weight`` is 100 (1 and 10 move nothing).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch

from domainfusion_bench.algorithms.base import register_algorithm
from domainfusion_bench.algorithms.cdga import CDGA
from domainfusion_bench.algorithms.domainfusion import DomainFusion
from domainfusion_bench.algorithms.tgdp import TGDP
from domainfusion_bench.diffusion.backbones import Backbone
from domainfusion_bench.diffusion.oracle_guidance import (
    ClassifierJudge,
    ClassifierTrainConfig,
    DistillConfig,
    ImageValidityClassifier,
    OracleGuidanceResult,
    WarmStartValidityClassifier,
    run_rounds,
)
from domainfusion_bench.diffusion.samplers import GuidanceTerm
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.protocol import seed_hash
from domainfusion_bench.algorithms.validity import judge_hparams, run_judge

ROUND_KIND = "og_round_classifier"
DISTILLED_KIND = "og_distilled_classifier"


def og_hparams(space) -> None:
    """The og_ hyperparameters of guidance (defaults sized for DigitStyles on one CPU core)."""
    judge_hparams(space)
    space.add("og_rounds", 2)  # 0 = no guidance (the generation is still judged by the validity judge)
    # w in eps - sqrt(1-abar) w grad log C. Our choice, measured on DigitStyles (CDGA+OG, stencil held out, 2160
    # img2img images, 3.2% invalid unguided): w = 1 and 10 change nothing, 30 -> 2.6%, 100 -> 1.4% (an
    # independently trained judge: 3.2% -> 2.9% -> 2.3%, so most of the gain is not C gaming the judge)
    space.add("og_weight", 100.0, lambda r: float(r.choice([30.0, 100.0, 300.0])))
    space.add("og_samples_per_round", 256)  # images drawn and labelled per round (and per measurement)
    space.add("og_distill", True)  # guide the generation with one distilled network instead of the stack
    # train C on every (drawn image, class) pair the judge labelled, not only the intended class: our choice
    # (the paper's validity oracle is a fixed constraint); without it a 97%-valid draw leaves C at its prior
    space.add("og_counterfactual", True)
    # judge: each C starts as the validity judge plus a zero-initialised time embedding (pixel backbones;
    # latent ones train from scratch). Our choice: from scratch, 150-300 steps on one draw stay at chance
    # on the digit classes, so C carries no gradient (DigitStyles, measured)
    space.add("og_classifier_init", "judge")
    # guide only at t <= og_max_t (1000 = everywhere, the paper): above it C reads little of the image and its
    # gradient only pushes full trajectories off course (TGDP+OG, measured)
    space.add("og_max_t", 1000)
    space.add("og_classifier_width", 16)  # channels of the validity classifier's first stage
    space.add("og_classifier_steps", 300)  # Adam steps per round classifier (and for the distilled one)
    space.add("og_classifier_lr", 2e-3)
    space.add("og_classifier_batch_size", 64)


class OracleGuided:
    """Oracle-assisted guidance for a ``GenerativeAlgorithm``: put it first in the bases."""

    # small enough for the contract tests' few-step runs
    OG_SMOKE_HPARAMS = {"og_rounds": 1, "og_samples_per_round": 16, "og_classifier_steps": 5, "og_judge_steps": 5}
    # hparam prefixes that decide what the method generates (they key the cached round classifiers)
    OG_GENERATION_PREFIXES: tuple[str, ...] = ("diffusion_backbone", "ddpm_steps", "sample_steps", "og_")

    @classmethod
    def hparam_space(cls, space, dataset):
        super().hparam_space(space, dataset)
        og_hparams(space)

    # --- the validity judge ---------------------------------------------------------------------
    def og_judge(self, context, backbone: Backbone) -> ClassifierJudge:
        return run_judge(self, context, backbone)

    # --- drawing samples to label -------------------------------------------------------------------
    def og_draw(self, context, backbone: Backbone, terms: Sequence[GuidanceTerm], round_name: str, n: int):
        """(SampleOutput of ``n`` images in [0, 1], their intended classes), generated as this method generates.

        Default: full trajectories for (uniform class, uniform training domain); methods that generate
        differently (CDGA's img2img) override it."""
        args = context.args
        g = torch.Generator().manual_seed(seed_hash("og-draw", args.trial_seed, round_name))
        labels = torch.randint(context.dataset.num_classes, (n,), generator=g)
        envs = torch.tensor(context.train_envs)[torch.randint(len(context.train_envs), (n,), generator=g)]
        cond = backbone.condition(labels, [int(e) for e in envs])
        seeds = [seed_hash("og", args.trial_seed, round_name, i) for i in range(n)]
        out = self.sampler(backbone, terms).sample(cond, seeds)
        return out, labels

    def _og_counted_draw(self, context, backbone, terms, round_name):
        n = int(self.hparams["og_samples_per_round"])
        with context.autocast():
            out, labels = self.og_draw(context, backbone, terms, round_name, n)
        # each guided denoising step evaluates every term's gradient once (nfe counts CFG calls twice)
        steps = sum(out.nfe) / (2 if self._og_cfg() else 1)
        spent = {"og_samples_drawn": len(labels), "generated_images": len(labels), "nfe": float(sum(out.nfe)),
                 "generation_seconds": out.seconds, "og_guidance_evals": float(steps * len(terms))}
        ledger = self._og_ledger if getattr(self, "_og_ledger", None) is not None else None
        for name, value in spent.items():
            if ledger is not None:  # charged when the cached model that needed the draw is used
                ledger[name] = ledger.get(name, 0.0) + float(value)
            else:
                context.costs.add(name, value)
        context.heartbeat()
        return out.images, labels

    def _og_cfg(self) -> bool:
        return False

    @staticmethod
    def _og_warm_start(hp, backbone: Backbone, ds) -> bool:
        """Start each validity classifier from the validity judge (``og_classifier_init: judge``) where the
        judge reads the denoiser's own space: a pixel backbone at the judge's resolution and channels."""
        init = str(hp["og_classifier_init"])
        if init not in ("judge", "scratch"):
            raise DfbenchError(f"og_classifier_init must be 'judge' or 'scratch', got {init!r}")
        pixel = tuple(backbone.latent_shape()) == (int(ds.input_shape[0]), backbone.resolution, backbone.resolution)
        return init == "judge" and backbone.kind == "pixel_ddpm" and pixel

    # --- the rounds ---------------------------------------------------------------------------------
    def og_result(self, context, backbone: Backbone) -> OracleGuidanceResult | None:
        cached = getattr(self, "_og_result", None)
        if cached is not None or int(self.hparams["og_rounds"]) <= 0:
            return cached
        hp, ds, args = self.hparams, context.dataset, context.args
        judge = self.og_judge(context, backbone)
        channels = int(backbone.latent_shape()[0])
        warm = self._og_warm_start(hp, backbone, ds)
        max_t = int(hp["og_max_t"]) if int(hp["og_max_t"]) < backbone.num_train_timesteps else None
        cls_config = {"arch": "WarmStartValidityClassifier(judge)" if warm else "ImageValidityClassifier",
                      "prior": "offset", "width": int(hp["og_classifier_width"]), "channels": channels,
                      "num_classes": ds.num_classes}
        train_config = ClassifierTrainConfig(steps=int(hp["og_classifier_steps"]), lr=float(hp["og_classifier_lr"]),
                                             batch_size=int(hp["og_classifier_batch_size"]), seed=args.trial_seed)
        distill_config = DistillConfig(steps=int(hp["og_classifier_steps"]), lr=float(hp["og_classifier_lr"]),
                                       batch_size=int(hp["og_classifier_batch_size"]), seed=args.trial_seed)
        generation = {k: v for k, v in sorted(hp.items()) if k.startswith(self.OG_GENERATION_PREFIXES)}
        base_identity = {"backbone": backbone.key, "method": type(self).registered_name, "generation": generation,
                         "judge": judge.key, "classifier": cls_config, "train": train_config.to_json(),
                         "distill": distill_config.to_json()}
        keys: list[str] = []  # store keys of the rounds so far: round k's data depends on them

        def new_classifier(k):
            if warm:
                net = judge.classifier
                c = WarmStartValidityClassifier(copy.deepcopy(net.body), copy.deepcopy(net.head), ds.num_classes,
                                                num_train_timesteps=backbone.num_train_timesteps)
            else:
                c = ImageValidityClassifier(channels, ds.num_classes, cls_config["width"],
                                            num_train_timesteps=backbone.num_train_timesteps)
            c.guide_max_t = max_t
            return c

        def cached(kind, index, build, train):
            ledger: dict[str, float] = {}

            def train_and_log(module):
                self._og_ledger = ledger
                try:
                    info = train(module)
                finally:
                    self._og_ledger = None
                return {**info, "draw_costs": dict(ledger)}

            entry = context.models.get_or_train(
                ROUND_KIND if kind == "round" else DISTILLED_KIND, dataset=ds, train_envs=context.train_envs,
                trial_seed=args.trial_seed, holdout_fraction=args.holdout_fraction,
                config={**base_identity, "index": index, "previous": list(keys)}, build=build, train=train_and_log,
                costs=context.costs, made_by=context.made_by, device=context.device, guard=backbone.guard)
            keys.append(entry.key)
            # the draws this model needed count in every run that uses it (as reused_ when another run paid)
            for name, value in entry.info.get("draw_costs", {}).items():
                context.costs.add(name, value)
                if entry.reused:
                    context.costs.add(f"reused_{name}", value)
            return entry.module, entry.info

        # classifiers train in float32; only the draws run in the run's precision
        result = run_rounds(
            lambda terms, name: self._og_counted_draw(context, backbone, terms, name), judge,
            lambda images: backbone.encode(images.to(backbone.device)), new_classifier, int(hp["og_rounds"]),
            float(hp["og_weight"]), alphas_cumprod=backbone.alphas_cumprod, train_config=train_config,
            distill=bool(hp["og_distill"]), distill_config=distill_config, measure_last=False, cached=cached,
            heartbeat=context.heartbeat, name=f"og-{type(self).registered_name}",
            counterfactual=bool(hp["og_counterfactual"]))
        for name, rate in result.rates().items():
            context.metrics.set(f"invalid_rate_{name}", rate)
        print(f"{type(self).registered_name}: judge val acc {context.metrics.values.get('judge_val_acc', float('nan')):.3f}; "
              "invalid rate " + ", ".join(f"{k} {v:.3f}" for k, v in result.rates().items()))
        self._og_result = result
        return result

    # --- the shared generative hooks ------------------------------------------------------------------
    def guidance_terms(self, context, backbone: Backbone) -> list[GuidanceTerm]:
        terms = list(super().guidance_terms(context, backbone))
        result = self.og_result(context, backbone)
        if result is None:
            return terms
        return terms + result.terms(f"og-{type(self).registered_name}")

    def after_generation(self, context, images: torch.Tensor, labels: torch.Tensor, env: int,
                         round_name: str = "base") -> None:
        super().after_generation(context, images, labels, env, round_name)  # judges: metric_invalid_rate
        rate = getattr(self, "_og_rate", None)
        result = getattr(self, "_og_result", None)
        if rate is not None and result is not None and result.distilled is None and result.classifiers:
            # with guidance but without distillation, the training generation is the full stack's draw
            context.metrics.set(f"invalid_rate_round{len(result.classifiers)}", rate)

    # --- previews: the preview's requests unguided and per round (same sources and seeds) ------------
    def preview_variants(self, context, sampler, requests, strength):
        from domainfusion_bench.diffusion.oracle_guidance import ValidityGuidance, stack_terms
        from domainfusion_bench.diffusion.samplers import DDIMSampler

        result = getattr(self, "_og_result", None)
        others = [t for t in sampler.guidance if not isinstance(t, ValidityGuidance)]
        levels = [("unguided", others)]
        if result is not None:
            name = f"og-{type(self).registered_name}"
            levels += [(f"round{k}", others + stack_terms(result.classifiers[:k], result.weight, name))
                       for k in range(1, len(result.classifiers) + 1)]
            if result.distilled is not None:
                levels.append(("distilled", list(sampler.guidance)))
        out = []
        for k, (og, terms) in enumerate(levels):
            images = None  # the last level is what the training images were drawn with
            if k < len(levels) - 1:
                redraw = DDIMSampler(sampler.backbone, sampler.config, guidance=terms)
                images, _ = context.generations.generate(redraw, requests, strength, made_by=context.made_by,
                                                         progress=False, uint8=True)
            out.append((og, images, [type(t).__name__ for t in terms]))
        return out


@register_algorithm("CDGA+OG")
class CDGAOG(OracleGuided, CDGA):
    """CDGA whose img2img generations are guided away from images the judge would reject."""

    SMOKE_HPARAMS = {**CDGA.SMOKE_HPARAMS, **OracleGuided.OG_SMOKE_HPARAMS}

    OG_GENERATION_PREFIXES = OracleGuided.OG_GENERATION_PREFIXES + ("cdga_",)

    def _og_cfg(self) -> bool:
        return float(self.hparams["cdga_guidance"]) != 1.0

    def og_draw(self, context, backbone, terms, round_name, n):
        """img2img from a seeded subset of CDGA's own requests (all training domains, other targets)."""
        hp, args = self.hparams, context.args
        requests = []
        for split, env in zip(context.train_splits, context.train_envs):
            requests += self.requests(context, split, env, backbone)
        if not requests:
            raise DfbenchError("CDGA+OG: CDGA made no generation requests to draw oracle-guidance rounds from")
        g = torch.Generator().manual_seed(seed_hash("og-pick", args.trial_seed, round_name))
        pick = torch.randint(len(requests), (n,), generator=g).tolist() if n > len(requests) else \
            torch.randperm(len(requests), generator=g)[:n].tolist()
        chosen = [requests[i] for i in pick]
        labels = torch.tensor([r.class_id for r in chosen], dtype=torch.long)
        cond = backbone.condition(labels, [r.domains for r in chosen])
        seeds = [seed_hash("og", round_name, r.seed, i) for i, r in enumerate(chosen)]
        sources = torch.stack([r.source for r in chosen])
        sampler = self.sampler(backbone, terms, guidance_scale=hp["cdga_guidance"])
        out = sampler.img2img(sources, cond, hp["cdga_strength"], seeds, [r.source_domain for r in chosen])
        return out, labels


@register_algorithm("DomainFusion+OG")
class DomainFusionOG(OracleGuided, DomainFusion):
    """DomainFusion whose pool and refresh candidates are guided away from images the judge would reject."""

    SMOKE_HPARAMS = {**DomainFusion.SMOKE_HPARAMS, **OracleGuided.OG_SMOKE_HPARAMS}
    OG_GENERATION_PREFIXES = OracleGuided.OG_GENERATION_PREFIXES + ("df_",)

    def og_draw(self, context, backbone, terms, round_name, n):
        """img2img as DomainFusion generates: seeded in-split sources of every training domain, toward
        DomainFusion's targets (another training domain or a mix), at ``df_strength``."""
        ds, args = context.dataset, context.args
        g = torch.Generator().manual_seed(seed_hash("og-pick", args.trial_seed, round_name))
        sources, labels, targets, envs = [], [], [], []
        for i in range(n):
            pos = int(torch.randint(len(context.train_envs), (1,), generator=g))
            split, env = context.train_splits[pos], context.train_envs[pos]
            x, y = split.dataset[split.indices[int(torch.randint(len(split.indices), (1,), generator=g))]]
            sources.append(self.source_image(context, x, backbone))
            labels.append(int(y))
            targets.append(self._target(env, context.train_envs, len(ds.domains), ("og", args.trial_seed, round_name, i)))
            envs.append(env)
        labels = torch.tensor(labels, dtype=torch.long)
        seeds = [seed_hash("og", args.trial_seed, round_name, i) for i in range(n)]
        out = self.sampler(backbone, terms).img2img(torch.stack(sources), backbone.condition(labels, targets),
                                                    self.hparams["df_strength"], seeds, envs)
        return out, labels


@register_algorithm("TGDP+OG")
class TGDPOG(OracleGuided, TGDP):
    """TGDP whose density-ratio-guided samples are also guided away from images the judge would reject."""

    SMOKE_HPARAMS = {**TGDP.SMOKE_HPARAMS, **OracleGuided.OG_SMOKE_HPARAMS}
    OG_GENERATION_PREFIXES = OracleGuided.OG_GENERATION_PREFIXES + ("tgdp_",)

    @classmethod
    def hparam_space(cls, space, dataset):
        """Full trajectories from t = T take guidance worse than img2img from t = T/2. Measured on DigitStyles
        (trial 0, stencil held out, 360 training images; TGDP alone 57.3% invalid): the defaults of the other
        +OG rows (2 rounds, w 100) 61-73%; w 10 or 30, 2 rounds, 66-69% (round 1 helps, the 2-round stack
        hurts); 1 round, w 30, guidance only at t <= 600: 54.7% (round 1's own draw 46.5%)."""
        super().hparam_space(space, dataset)
        space.add("og_rounds", 1)
        space.add("og_weight", 30.0, lambda r: float(r.choice([10.0, 30.0, 100.0])))
        space.add("og_max_t", 600)

    def og_draw(self, context, backbone, terms, round_name, n):
        """Full trajectories as TGDP draws them: class-conditional samples of the pooled model guided by
        grad log h toward each entry of TGDP's sampling plan in turn (targets, then mixes), plus ``terms``:
        the rounds learn the failures of the very sampler they will guide."""
        from domainfusion_bench.diffusion.samplers import SampleOutput

        h, plan = self._density_guide
        g = torch.Generator().manual_seed(seed_hash("og-draw", context.args.trial_seed, round_name))
        labels = torch.randint(context.dataset.num_classes, (n,), generator=g)
        seeds = [seed_hash("og", context.args.trial_seed, round_name, i) for i in range(n)]
        entry = torch.arange(n) % len(plan)
        images, nfe, seconds = None, [0] * n, 0.0
        for k, (_, head, mix, _) in enumerate(plan):
            idx = (entry == k).nonzero().flatten().tolist()
            if not idx:
                continue
            sampler = self.sampler(backbone, [self.density_term(h, head, mix), *terms])
            out = sampler.sample(backbone.condition(labels[idx], [{}] * len(idx)), [seeds[i] for i in idx])
            if images is None:
                images = torch.zeros(n, *out.images.shape[1:], dtype=out.images.dtype)
            images[idx] = out.images.cpu()
            for j, i in enumerate(idx):
                nfe[i] = out.nfe[j]
            seconds += out.seconds
        return SampleOutput(images=images, nfe=nfe, seconds=seconds), labels
