"""DiTi-features (Yue et al., ICLR 2024) as a DG featurizer: z from an encoder trained against a frozen DDPM.

Pre-stage (``prepare``): the shared pixel DDPM of the training domains (the one CDGA uses; trained on
their in-splits only) stays frozen; a DiTi encoder and shift branch are trained against it on the same
in-splits (diffusion/diti.py has the method), once per (dataset, training domains, split seed, config)
and cached, its cost recorded as ``cost_diti_train_seconds`` (+ ``reused_`` when found in the cache).
The classifier then reads the encoder's z:

- ``probe``: z frozen, a linear head trained (the paper's linear-probe protocol);
- ``finetune``: CE + ``diti_lambda`` * DiTi loss on the same minibatches, encoder and branch trainable,
  the DDPM never updated;
- ``subset``: z frozen, the head reads only the dims of blocks ``diti_blocks`` ("lo-hi", inclusive; the
  default 32-63 is the t >= 500 stage: coarse content, which should carry class and not style).

Ours: z is standardised with the training in-splits' per-dim mean and std (buffers fixed after
pre-training) so one learning rate suits any encoder; the frozen DDPM is queried with the null
condition (DiTi is unsupervised; the shared DDPM learnt it through condition dropout).
``dfbench diti probe`` answers which slices carry class and which carry domain.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from domainfusion_bench.algorithms.base import register_algorithm
from domainfusion_bench.algorithms.erm import ERM
from domainfusion_bench.diffusion import build_backbone
from domainfusion_bench.diffusion.diti import (
    DiTiConfig,
    DiTiEncoder,
    DiTiObjective,
    ShiftBranch,
    as_unit,
    block_end_dims,
    encoder_resolution,
    format_probe_table,
    pretrain_diti,
    probe_slices,
    stage_slices,
)
from domainfusion_bench.diffusion.backbones import resize
from domainfusion_bench.diffusion.factory import MODELS_SUBDIR
from domainfusion_bench.diffusion.trainer import DEFAULT_STEPS, to_image_tensor
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.protocol import split_indices

MODES = ("probe", "finetune", "subset")
FORMAT = 1


def parse_blocks(text: str, k: int) -> tuple[int, int]:
    """'lo-hi' (inclusive block indices) or 'b' -> (lo, hi)."""
    try:
        lo, _, hi = str(text).partition("-")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise DfbenchError(f"diti_blocks must be 'lo-hi' block indices such as '32-63', got {text!r}") from None
    if not 0 <= lo <= hi < k:
        raise DfbenchError(f"diti_blocks {text!r} must satisfy 0 <= lo <= hi < k = {k}")
    return lo, hi


def config_from_hparams(hp: dict[str, Any]) -> DiTiConfig:
    return DiTiConfig(z_dim=hp["diti_z_dim"], k=hp["diti_k"], allocation=hp["diti_allocation"],
                      grad_mode=hp["diti_grad_mode"], encoder_width=hp["diti_encoder_width"],
                      branch_width=hp["diti_branch_width"], steps=hp["diti_steps"], batch_size=hp["diti_batch_size"],
                      lr=hp["diti_lr"], ema_decay=hp["diti_ema_decay"], seed=hp["diti_seed"])


def z_slice(hp: dict[str, Any]) -> tuple[int, int]:
    """The dims the classifier reads: all of z, or the blocks of ``diti_blocks`` in subset mode."""
    if hp["diti_mode"] not in MODES:
        raise DfbenchError(f"diti_mode must be one of {', '.join(MODES)}, got {hp['diti_mode']!r}")
    if hp["diti_mode"] != "subset":
        return 0, hp["diti_z_dim"]
    ends = block_end_dims(1000, hp["diti_k"], hp["diti_z_dim"], hp["diti_allocation"])
    lo, hi = parse_blocks(hp["diti_blocks"], hp["diti_k"])
    start, end = (ends[lo - 1] if lo else 0), ends[hi]
    if end <= start:
        raise DfbenchError(f"diti_blocks {hp['diti_blocks']} hold no dims under the {hp['diti_allocation']} allocation")
    return start, end


class DiTiFeaturizer(nn.Module):
    """model input -> [0, 1] images -> encoder -> standardised z[start:end]."""

    def __init__(self, encoder: DiTiEncoder, start: int, end: int):
        super().__init__()
        self.encoder, self.start, self.end = encoder, start, end
        self.n_outputs = end - start
        self.register_buffer("mean", torch.zeros(encoder.z_dim))
        self.register_buffer("std", torch.ones(encoder.z_dim))
        self.to_unit = None  # set in prepare from the dataset (identity for [0, 1] tensor datasets)

    def z(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.to_unit(x) if self.to_unit is not None else x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (self.z(x).float() - self.mean) / self.std
        return z[:, self.start:self.end]


def unit_mapping(dataset):
    """How model inputs map back to [0, 1]: the dataset's own ``to_unit``, or identity for tensor datasets."""
    to_unit = getattr(dataset, "to_unit", None)
    if to_unit is not None:
        return to_unit
    if dataset.eval_transform() is None and dataset.train_transform(True) is None:
        return None
    raise DfbenchError(f"DiTi needs {dataset.name}'s model inputs mapped back to [0, 1] (dataset.to_unit), "
                       "which this dataset does not provide yet")


def split_images(dataset, envs: Sequence[int], trial_seed: int, holdout_fraction: float, which: str, resolution: int):
    """(images uint8 [N, C, r, r], classes, domain positions in ``envs``) of the ``which`` ('in'/'out') splits."""
    xs, ys, ds = [], [], []
    channels = int(dataset.input_shape[0])
    for pos, env in enumerate(envs):
        out_idx, in_idx = split_indices(len(dataset.envs[env]), trial_seed, env, holdout_fraction)
        idx = in_idx if which == "in" else out_idx
        data = dataset.envs[env]
        if isinstance(data, torch.utils.data.TensorDataset):
            x = resize(data.tensors[0][torch.as_tensor(idx, dtype=torch.long)].float(), resolution)
            y = data.tensors[1][torch.as_tensor(idx, dtype=torch.long)].long()
        else:
            items = [data[i] for i in idx]
            x = torch.stack([to_image_tensor(a, channels, resolution) for a, _ in items])
            y = torch.tensor([int(b) for _, b in items], dtype=torch.long)
        xs.append((x.clamp(0, 1) * 255).round().to(torch.uint8))
        ys.append(y)
        ds.append(torch.full((len(y),), pos, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys), torch.cat(ds)


def diti_key(dataset, train_envs, trial_seed, holdout_fraction, backbone_key: str, config: DiTiConfig, res: int) -> str:
    ident = {"format": FORMAT, "dataset": dataset.name, "domains": list(dataset.domains), "sizes": dataset.sizes(),
             "train_envs": sorted(int(e) for e in train_envs), "trial_seed": trial_seed,
             "holdout_fraction": holdout_fraction, "backbone": backbone_key, "config": config.to_json(),
             "encoder_resolution": res}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def trained_encoder(backbone, dataset, train_envs, test_envs, *, trial_seed: int, holdout_fraction: float,
                    config: DiTiConfig, cache_dir: Path, device, costs=None, made_by: str | None = None,
                    progress: bool = True):
    """(encoder, branch, info): from the cache, or pre-trained on the training domains' in-splits and cached.

    Interim file cache (FileLock, atomic folder) until the layer's cached-model store lands; then this
    becomes one ``context.models.get_or_train(kind="diti_encoder", ...)`` call around ``pretrain_diti``.
    """
    from filelock import FileLock
    from safetensors.torch import load_file, save_file

    if set(train_envs) & set(test_envs):
        raise DfbenchError(f"leakage guard: DiTi pre-training domains {sorted(train_envs)} include held-out "
                           f"{sorted(set(train_envs) & set(test_envs))}")
    res = encoder_resolution(dataset.input_shape)
    key = diti_key(dataset, train_envs, trial_seed, holdout_fraction, backbone.key, config, res)
    root = Path(cache_dir) / "diti"
    root.mkdir(parents=True, exist_ok=True)
    path = root / key[:24]
    channels = int(dataset.input_shape[0])
    with FileLock(str(root / f"{key[:24]}.lock")):
        reused = (path / "meta.json").exists()
        if not reused:
            images, _, _ = split_images(dataset, train_envs, trial_seed, holdout_fraction, "in", res)
            names = ",".join(dataset.domains[e] for e in train_envs)
            encoder, branch, info = pretrain_diti(backbone, images, config, device, progress, encoder_res=res,
                                                  desc=f"DiTi encoder {dataset.name} on {names}")
            with torch.no_grad():
                z = torch.cat([encoder(as_unit(images[i:i + 256].to(device))) for i in range(0, len(images), 256)])
            info.update(made_by=made_by, key=key, train_envs=sorted(train_envs), seen_domains=sorted(train_envs),
                        z_mean=z.mean(0).tolist(), z_std=z.std(0).clamp(min=1e-6).tolist())
            tmp = root / f".{key[:24]}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(tmp / "encoder.safetensors"))
            save_file({k: v.contiguous() for k, v in branch.state_dict().items()}, str(tmp / "branch.safetensors"))
            (tmp / "meta.json").write_text(json.dumps(info))
            os.replace(tmp, path)
    info = json.loads((path / "meta.json").read_text())
    if set(info["seen_domains"]) & set(test_envs):
        raise DfbenchError(f"leakage guard: cached DiTi encoder {path} saw held-out domains")
    encoder = DiTiEncoder(channels, config.z_dim, config.encoder_width, res)
    branch = ShiftBranch(backbone.latent_shape(), config.z_dim, config.branch_width)
    encoder.load_state_dict(load_file(str(path / "encoder.safetensors")))
    branch.load_state_dict(load_file(str(path / "branch.safetensors")))
    seconds = float(info["train_seconds"])
    if costs is not None:
        costs.add("diti_train_seconds", seconds)
        if reused and (made_by is None or info.get("made_by") != made_by):
            costs.add("reused_diti_train_seconds", seconds)
    info["reused"] = reused
    return encoder.to(device).eval(), branch.to(device).eval(), info


def frozen_backbone(hp, dataset, train_envs, test_envs, *, trial_seed, holdout_fraction, cache_dir, device,
                    costs=None, made_by=None):
    """The shared DDPM (same spec and steps as CDGA's default, so the cache entry is shared), frozen."""
    return build_backbone(hp["diffusion_backbone"], dataset=dataset, train_envs=train_envs, test_envs=test_envs,
                          cache_dir=Path(cache_dir) / MODELS_SUBDIR, device=device, trial_seed=trial_seed,
                          holdout_fraction=holdout_fraction, costs=costs, ddpm_steps=hp["ddpm_steps"],
                          made_by=made_by).eval()


@register_algorithm("DiTi")
class DiTi(ERM):
    """DiTi features: an encoder trained against the frozen DDPM; probe / finetune / subset of its z."""

    NEEDS = "the shared pixel DDPM (trained here on the training domains) or sd:<checkpoint>; trains a DiTi encoder"
    GENERATIVE = True

    @classmethod
    def hparam_space(cls, space, dataset):
        super().hparam_space(space, dataset)
        # shared with the other generative methods (the generative base will own these two)
        space.add("diffusion_backbone", "pixel_ddpm")
        space.add("ddpm_steps", DEFAULT_STEPS)
        space.add("diti_mode", "probe")  # probe | finetune | subset
        space.add("diti_blocks", "32-63")  # subset mode: inclusive block range the head reads
        space.add("diti_lambda", 1.0, lambda r: 10 ** r.uniform(-1, 1))  # finetune: weight of the DiTi loss
        space.add("diti_z_dim", 512)
        space.add("diti_k", 64)
        space.add("diti_allocation", "stages")  # stages | uniform (the ablation)
        space.add("diti_grad_mode", "base")  # base | stop_grad | dual
        space.add("diti_encoder_width", 32)
        space.add("diti_branch_width", 32)
        space.add("diti_steps", 300)  # pre-training steps (cached per training domains, trial and config)
        space.add("diti_batch_size", 32)
        space.add("diti_lr", 1e-3)
        space.add("diti_ema_decay", 0.99)
        space.add("diti_seed", 0)

    @classmethod
    def featurizer_override(cls, input_shape, hparams):
        start, end = z_slice(hparams)
        encoder = DiTiEncoder(int(input_shape[0]), hparams["diti_z_dim"], hparams["diti_encoder_width"],
                              encoder_resolution(input_shape))
        return DiTiFeaturizer(encoder, start, end)

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.mode = hparams["diti_mode"]
        self.config = config_from_hparams(hparams)
        self.objective: DiTiObjective | None = None
        self.branch: ShiftBranch | None = None

    def prepare(self, context):
        devices = [context.device] if torch.device(context.device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            self._pretrain(context)
        return None

    def _pretrain(self, context):
        hp, ds, args = self.hparams, context.dataset, context.args
        made_by = getattr(context, "made_by", None) or str(Path(args.output_dir).resolve())
        common = dict(trial_seed=args.trial_seed, holdout_fraction=args.holdout_fraction, costs=context.costs,
                      made_by=made_by)
        backbone = frozen_backbone(hp, ds, context.train_envs, context.test_envs, cache_dir=context.cache_dir,
                                   device=context.device, **common)
        encoder, branch, info = trained_encoder(backbone, ds, context.train_envs, context.test_envs, config=self.config,
                                                cache_dir=context.cache_dir / MODELS_SUBDIR, device=context.device,
                                                **common)
        if info["end_dims"] != block_end_dims(1000, self.config.k, self.config.z_dim, self.config.allocation):
            raise DfbenchError(f"DiTi assumes T = 1000 diffusion steps; this backbone has {backbone.num_train_timesteps}")
        feat = self.featurizer
        feat.encoder.load_state_dict(encoder.state_dict())
        feat.mean.copy_(torch.tensor(info["z_mean"]))
        feat.std.copy_(torch.tensor(info["z_std"]))
        feat.to_unit = unit_mapping(ds)
        if self.mode == "finetune":
            self.branch = branch.train().requires_grad_(True)
            self.objective = DiTiObjective(backbone, self.config)
        else:
            feat.encoder.requires_grad_(False).eval()
        print(f"DiTi ({self.mode}): encoder {info['key'][:12]} {'reused' if info['reused'] else 'trained'} "
              f"({info['train_seconds']:.1f} s), DiTi loss {info['eval_loss']:.4f} vs frozen {info['eval_frozen_loss']:.4f}; "
              f"head reads z[{feat.start}:{feat.end}]")

    def configure_optimizer(self, params=None):
        return super().configure_optimizer([p for p in self.parameters() if p.requires_grad] if params is None else params)

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "mode", "finetune") != "finetune":
            self.featurizer.encoder.eval()  # frozen features: GroupNorm has no running stats, but say it
        return self

    def loss(self, minibatches):
        x = torch.cat([x for x, _ in minibatches])
        y = torch.cat([y for _, y in minibatches])
        ce = F.cross_entropy(self.predict(x), y)
        if self.mode != "finetune" or self.objective is None:
            return ce, {}
        feat = self.featurizer
        x01 = feat.to_unit(x) if feat.to_unit is not None else x
        diti, frozen = self.objective.loss(feat.encoder, self.branch, x01.float())
        return ce + self.hparams["diti_lambda"] * diti, {"ce": ce.detach(), "diti_loss": diti.detach(),
                                                          "diti_frozen_loss": frozen}


def probe_report(dataset_name: str, data_dir, test_envs: Sequence[int], *, hparams_json: str | None = None,
                 trial_seed: int = 0, holdout_fraction: float = 0.2, cache_dir=None, device: str = "auto",
                 json_out=None) -> list[dict[str, Any]]:
    """``dfbench diti probe``: linear-probe class and domain accuracy of each time-step slice of z.

    The encoder is the one a DiTi run with these hyperparameters uses (same cache); probes are fitted on
    the training domains' in-splits and scored on their out-splits (the held-out domains are never read).
    """
    from domainfusion_bench.algorithms import algorithm_space
    from domainfusion_bench.data import dataset_class, get_dataset
    from domainfusion_bench.hparams import apply_overrides, parse_hparams_json

    dataset = get_dataset(dataset_name, data_dir)
    dataset.check_test_envs(test_envs)
    hp = apply_overrides(algorithm_space("DiTi", dataset_class(dataset_name)).defaults(),
                         parse_hparams_json(hparams_json), f"DiTi on {dataset_name}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cache_dir = Path(cache_dir) if cache_dir else Path(data_dir) / ".dfbench_cache"
    train_envs = [i for i in range(len(dataset.domains)) if i not in test_envs]
    config = config_from_hparams(hp)
    common = dict(trial_seed=trial_seed, holdout_fraction=holdout_fraction)
    backbone = frozen_backbone(hp, dataset, train_envs, test_envs, cache_dir=cache_dir, device=device, **common)
    encoder, _, info = trained_encoder(backbone, dataset, train_envs, test_envs, config=config,
                                       cache_dir=cache_dir / MODELS_SUBDIR, device=device, **common)
    res = encoder.resolution

    @torch.no_grad()
    def features(which):
        x, y, d = split_images(dataset, train_envs, trial_seed, holdout_fraction, which, res)
        z = torch.cat([encoder(as_unit(x[i:i + 256].to(device))).cpu() for i in range(0, len(x), 256)])
        return z, y, d

    fit, held = features("in"), features("out")
    slices = stage_slices(info["end_dims"], backbone.num_train_timesteps, config.k)
    rows = probe_slices(*fit, *held, slices)
    print(f"DiTi probe on {dataset.name}, training domains {', '.join(dataset.domains[e] for e in train_envs)} "
          f"(held out: {', '.join(dataset.domains[e] for e in test_envs)}), trial {trial_seed}; "
          f"fit on in-splits ({len(fit[0])}), scored on out-splits ({len(held[0])}); encoder "
          f"{info['key'][:12]}, DiTi loss {info['eval_loss']:.4f} vs frozen {info['eval_frozen_loss']:.4f}")
    print(format_probe_table(rows, dataset.num_classes, len(train_envs)))
    if json_out:
        Path(json_out).write_text(json.dumps({"dataset": dataset.name, "test_envs": list(test_envs),
                                              "trial_seed": trial_seed, "hparams": hp, "rows": rows}, indent=1))
    return rows
