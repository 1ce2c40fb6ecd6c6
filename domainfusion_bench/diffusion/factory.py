"""Backbones from a spec string, for a run: ``pixel_ddpm`` (trained here on the training domains and
cached), ``sd:<local folder or hub id>`` (a diffusers Stable Diffusion checkpoint), ``sd:tiny`` (random
tiny SD components built from configs: exercises the latent/text path offline, generates noise)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from domainfusion_bench.diffusion.backbones import Backbone, BackboneSpec, PixelDDPMBackbone, StableDiffusionBackbone
from domainfusion_bench.diffusion.oracle_ddpm import ORACLE_STEPS, train_oracle_ddpm
from domainfusion_bench.diffusion.trainer import default_config, train_pixel_ddpm
from domainfusion_bench.protocol import HOLDOUT_FRACTION


def build_backbone(spec: str, *, dataset, train_envs: Sequence[int], test_envs: Sequence[int],
                   cache_dir: str | Path | None = None, store=None, device: str | torch.device = "cpu", trial_seed: int = 0, holdout_fraction: float = HOLDOUT_FRACTION,
                   costs=None, ddpm_steps: int | None = None, ddpm_overrides: dict | None = None,
                   oracle: bool = False, progress: bool = True, made_by: str | None = None,
                   few_shot_target: int = 0) -> Backbone:
    """A backbone with the run's leakage guard installed (``oracle``: may condition on held-out domains; for
    the pixel DDPM an oracle row wants ``oracle_pixel_ddpm`` instead, whose held-out embedding was trained;
    ``few_shot_target``: the labelled few-shot-target track may use that many unlabelled held-out images)."""
    parsed = BackboneSpec.parse(spec)
    if parsed.kind == "pixel_ddpm":
        config = default_config(dataset, steps=ddpm_steps, **(ddpm_overrides or {}))
        trained = train_pixel_ddpm(dataset, train_envs, test_envs, trial_seed=trial_seed,
                                   holdout_fraction=holdout_fraction, config=config, cache_dir=cache_dir,
                                   store=store, device=device, progress=progress, costs=costs, allow_condition_on_held_out=oracle,
                                   made_by=made_by)
        return trained.backbone.restrict(test_envs, allow_condition=oracle, few_shot_target=few_shot_target)
    common = dict(dataset=dataset.name, domains=dataset.domains, classes=dataset.classes,
                  image_channels=int(dataset.input_shape[0]))
    if parsed.source == "tiny":
        from domainfusion_bench.diffusion.tiny import tiny_components

        backbone = StableDiffusionBackbone.from_components(**tiny_components(), **common)
    else:
        dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
        backbone = StableDiffusionBackbone.from_pretrained(parsed.source, dtype=dtype, **common)
    return backbone.to(device).restrict(test_envs, allow_condition=oracle, few_shot_target=few_shot_target)


def oracle_pixel_ddpm(base: PixelDDPMBackbone, *, dataset, train_envs: Sequence[int], test_envs: Sequence[int], store,
                    device: str | torch.device = "cpu", trial_seed: int = 0, holdout_fraction: float = HOLDOUT_FRACTION,
                    costs=None, ddpm_steps: int | None = None, oracle_ddpm_steps: int = ORACLE_STEPS,
                    progress: bool = True, made_by: str | None = None) -> Backbone:
    """An oracle row's pixel DDPM: the oracle DDPM fine-tuned from ``base`` (the run's pixel DDPM) on the
    held-out out-split as well (``diffusion/oracle_ddpm.py``). Other backbones need nothing of the kind: a
    text-conditioned model already knows the held-out domain's description (``build_backbone(oracle=True)``)."""
    config = default_config(dataset, steps=ddpm_steps)
    return train_oracle_ddpm(base, dataset, train_envs, test_envs, trial_seed=trial_seed,
                             holdout_fraction=holdout_fraction, config=config, store=store, device=device,
                             steps=oracle_ddpm_steps, progress=progress, costs=costs, made_by=made_by).backbone


MODELS_SUBDIR = "models"  # <cache_dir>/models/<kind>/<key>/: the cached-model store (pixel DDPMs, helper models)
GENERATIONS_SUBDIR = "generations"  # <cache_dir>/generations/: images + manifest.jsonl


def train_command(dataset_name: str, data_dir: str | Path, test_envs: Sequence[int], *, steps: int | None = None,
                  cache_dir: str | Path | None = None, trial_seed: int = 0, holdout_fraction: float = HOLDOUT_FRACTION,
                  device: str = "auto", preview: str | Path | None = None) -> Path:
    """``dfbench diffusion train``: train (or find) the pixel DDPM CDGA would use for these test envs."""
    from domainfusion_bench.data import get_dataset

    dataset = get_dataset(dataset_name, data_dir)
    dataset.check_test_envs(test_envs)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cache_dir = Path(cache_dir) if cache_dir else Path(data_dir) / ".dfbench_cache"
    train_envs = [i for i in range(len(dataset.domains)) if i not in test_envs]
    config = default_config(dataset, steps=steps)
    trained = train_pixel_ddpm(dataset, train_envs, test_envs, trial_seed=trial_seed, holdout_fraction=holdout_fraction,
                               config=config, cache_dir=cache_dir / MODELS_SUBDIR, device=device)
    what = "found in cache" if trained.reused else "trained"
    print(f"pixel DDPM {what}: {trained.path} ({trained.train_seconds:.1f} s of training, "
          f"final loss {trained.backbone.info.get('final_loss', float('nan')):.4f}; "
          f"domains {', '.join(dataset.domains[e] for e in train_envs)})")
    if preview:
        write_preview(trained.backbone, train_envs, Path(preview))
        print(f"samples (rows: classes, columns: training domains) written to {preview}")
    return trained.path


def write_preview(backbone: Backbone, domains: Sequence[int], path: Path, guidance: float = 2.0, steps: int = 20) -> None:
    """A grid of full samples: one row per class, one column per domain."""
    from torchvision.utils import save_image

    from domainfusion_bench.diffusion.samplers import DDIMSampler, SamplerConfig

    classes = list(range(len(backbone.classes)))
    class_ids = [c for c in classes for _ in domains]
    domain_ids = [d for _ in classes for d in domains]
    sampler = DDIMSampler(backbone, SamplerConfig(steps=steps, guidance_scale=guidance, batch_size=256))
    out = sampler.sample(backbone.condition(class_ids, domain_ids), seeds=list(range(len(class_ids))))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(out.images, str(path), nrow=len(domains), padding=1)
