"""DiTi-features (Yue et al., ICLR 2024) as a DG featurizer: z from an encoder trained against a frozen DDPM.

Pre-stage (``prepare``): the shared pixel DDPM of the training domains (the one CDGA uses; trained on
their in-splits only) stays frozen; a DiTi encoder and shift branch are trained against it on the same
in-splits (diffusion/diti/ has the method), once per (dataset, training domains, split seed, config)
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

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from domainfusion_bench.algorithms.base import register_algorithm
from domainfusion_bench.algorithms.generative import GenerativeAlgorithm
from domainfusion_bench.diffusion import LeakageGuard, build_backbone
from domainfusion_bench.diffusion.backbones import BackboneSpec, resize
from domainfusion_bench.diffusion.diti import (
    DiTiConfig,
    DiTiEncoder,
    DiTiObjective,
    ShiftBranch,
    as_unit,
    block_end_dims,
    build_model,
    encoder_resolution,
    format_probe_table,
    pretrain_diti,
    probe_slices,
    stage_slices,
)
from domainfusion_bench.diffusion.factory import MODELS_SUBDIR
from domainfusion_bench.diffusion.store import ModelStore
from domainfusion_bench.diffusion.trainer import SHARED_TRIALS, default_config, shared_identity, training_indices
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.protocol import split_indices

MODES = ("probe", "finetune", "subset")
KIND = "diti_encoder"  # in the cached-model store; its cost is recorded as diti_train_seconds


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
    """model input -> [0, 1] images -> encoder -> standardised z[start:end].

    The input normalisation and z's statistics are buffers, so a saved model predicts without its dataset."""

    def __init__(self, encoder: DiTiEncoder, start: int, end: int):
        super().__init__()
        self.encoder, self.start, self.end = encoder, start, end
        self.n_outputs = end - start
        channels = encoder.in_channels
        self.register_buffer("input_mean", torch.zeros(1, channels, 1, 1))  # model input = (x01 - mean) / std
        self.register_buffer("input_std", torch.ones(1, channels, 1, 1))
        self.register_buffer("z_mean", torch.zeros(encoder.z_dim))
        self.register_buffer("z_std", torch.ones(encoder.z_dim))

    def set_input_normalization(self, normalization) -> None:
        if normalization is not None:
            mean, std = normalization
            self.input_mean.copy_(torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.input_std.copy_(torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def unit(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.input_std + self.input_mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (self.encoder(self.unit(x)).float() - self.z_mean) / self.z_std
        return z[:, self.start:self.end]


def split_images(dataset, envs: Sequence[int], trial_seed: int, holdout_fraction: float, which: str, resolution: int,
                 shared_trials: int = 0):
    """(images uint8 [N, C, r, r], classes, domain positions in ``envs``) of the ``which`` ('in'/'out') splits
    (``shared_trials``: the images in the in-split under every shared trial seed, see ``training_indices``)."""
    xs, ys, ds = [], [], []
    for pos, env in enumerate(envs):
        if which == "in":
            idx = training_indices(len(dataset.envs[env]), env, trial_seed, holdout_fraction, shared_trials)
        else:
            idx = split_indices(len(dataset.envs[env]), trial_seed, env, holdout_fraction)[0]
        data = dataset.envs[env]
        if isinstance(data, torch.utils.data.TensorDataset):
            x = resize(as_unit(data.tensors[0][torch.as_tensor(idx, dtype=torch.long)]), resolution)
            y = data.tensors[1][torch.as_tensor(idx, dtype=torch.long)].long()
        else:
            items = [data[i] for i in idx]
            x = resize(torch.stack([dataset.item_to_unit(a) for a, _ in items]), resolution)
            y = torch.tensor([int(b) for _, b in items], dtype=torch.long)
        xs.append((x.clamp(0, 1) * 255).round().to(torch.uint8))
        ys.append(y)
        ds.append(torch.full((len(y),), pos, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys), torch.cat(ds)


def trained_encoder(backbone, dataset, train_envs, test_envs, *, store: ModelStore, trial_seed: int,
                    holdout_fraction: float, config: DiTiConfig, device, costs=None, made_by: str | None = None,
                    progress: bool = True, heartbeat=None):
    """(DiTiModel with .encoder and .branch, info): from the cached-model store, or pre-trained against the
    frozen ``backbone`` on the training domains' in-splits (never a held-out domain) and stored. Trials 0-2
    share one encoder, as they share the DDPM (``diffusion.trainer.SHARED_TRIALS``)."""
    res = encoder_resolution(dataset.input_shape)
    store_seed, split = shared_identity(trial_seed)
    train_envs = sorted(int(e) for e in train_envs)
    channels = int(dataset.input_shape[0])

    def train(model):
        images, _, _ = split_images(dataset, train_envs, trial_seed, holdout_fraction, "in", res, SHARED_TRIALS)
        names = ",".join(dataset.domains[e] for e in train_envs)
        _, _, info = pretrain_diti(backbone, images, config, device, progress, encoder_res=res, model=model,
                                   desc=f"DiTi encoder {dataset.name} on {names}", heartbeat=heartbeat)
        return info

    entry = store.get_or_train(
        KIND, dataset=dataset, train_envs=train_envs, trial_seed=store_seed, holdout_fraction=holdout_fraction,
        config={**config.to_json(), "backbone": backbone.key, "encoder_resolution": res, "split": split},
        build=lambda: build_model(backbone, config, channels, res), train=train,
        guard=LeakageGuard(dataset.name, dataset.domains, test_envs), costs=costs, made_by=made_by, device=device,
        cost_name="diti_train_seconds")
    return entry.module, {**entry.info, "key": entry.key, "reused": entry.reused, "train_seconds": entry.train_seconds}


@register_algorithm("DiTi")
class DiTi(GenerativeAlgorithm):
    """DiTi features: an encoder trained against the frozen DDPM; probe / finetune / subset of its z."""

    NEEDS = "the shared pixel DDPM (trained here on the training domains) or sd:<checkpoint>; trains a DiTi encoder"
    DDP_EXACT = False  # finetuning's DiTi sub-sample and its noise are drawn per rank
    DDP_FIND_UNUSED = True  # the head reads one slice of z: encoder parts feeding only other slices get no gradient
    SMOKE_HPARAMS = {**GenerativeAlgorithm.SMOKE_HPARAMS, "diti_mode": "finetune", "diti_steps": 4, "diti_z_dim": 64,
                     "diti_encoder_width": 8, "diti_branch_width": 8, "diti_batch_size": 8}

    @classmethod
    def hparam_space(cls, space, dataset):
        super().hparam_space(space, dataset)
        space.add("diti_mode", "probe")  # probe | finetune | subset
        space.add("diti_blocks", "32-63")  # subset mode: inclusive block range the head reads
        space.add("diti_lambda", 1.0, lambda r: 10 ** r.uniform(-1, 1))  # finetune: weight of the DiTi loss
        # finetune: images per step the DiTi loss sees (an even stride through the minibatch, so every training
        # domain is in it; 0 = all). Ours: the loss costs a frozen-DDPM and a branch pass per image, 3x the CE's
        # cost at the full 3 x 32; 32 images keep its gradient while CE still reads the whole minibatch.
        space.add("diti_finetune_batch", 32)
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
        # also record linear-probe class/domain accuracy per time-step stage (metric_diti_*; ~10 s of CPU)
        space.add("diti_probe_metrics", False)

    @classmethod
    def build_featurizer(cls, input_shape, hparams):
        start, end = z_slice(hparams)
        encoder = DiTiEncoder(int(input_shape[0]), hparams["diti_z_dim"], hparams["diti_encoder_width"],
                              encoder_resolution(input_shape))
        return DiTiFeaturizer(encoder, start, end)

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.mode = hparams["diti_mode"]
        self.config = config_from_hparams(hparams)
        self.objective: DiTiObjective | None = None
        if self.mode == "finetune" and BackboneSpec.parse(hparams["diffusion_backbone"]).kind == "pixel_ddpm":
            # built now so a saved finetune model loads without its backbone (a latent backbone's is built in generate)
            resolution = default_config(SimpleNamespace(input_shape=self.input_shape)).model.resolution
            self.branch = ShiftBranch((self.input_shape[0], resolution, resolution), self.config.z_dim,
                                      self.config.branch_width)

    def generate(self, context):
        """Pre-train (or find) the encoder; DiTi changes the features, not the data: no new splits."""
        hp, ds, args = self.hparams, context.dataset, context.args
        backbone = self.backbone(context).eval()
        model, info = trained_encoder(backbone, ds, context.train_envs, context.test_envs, store=context.models,
                                      trial_seed=args.trial_seed, holdout_fraction=args.holdout_fraction,
                                      config=self.config, device=context.device, costs=context.costs,
                                      made_by=context.made_by, heartbeat=context.heartbeat)
        if info["end_dims"] != block_end_dims(1000, self.config.k, self.config.z_dim, self.config.allocation):
            raise DfbenchError(f"DiTi assumes T = 1000 diffusion steps; this backbone has {backbone.num_train_timesteps}")
        feat = self.featurizer
        feat.encoder.load_state_dict(model.encoder.state_dict())
        feat.z_mean.copy_(torch.tensor(info["z_mean"]))
        feat.z_std.copy_(torch.tensor(info["z_std"]))
        feat.set_input_normalization(getattr(ds, "NORMALIZATION", None))
        if self.mode == "finetune":
            if getattr(self, "branch", None) is None or self.branch.unet.config.sample_size != model.branch.unet.config.sample_size:
                self.branch = model.branch
            self.branch.load_state_dict(model.branch.state_dict())
            self.branch.to(context.device).train().requires_grad_(True)
            self.objective = DiTiObjective(backbone, self.config)
        else:
            feat.encoder.requires_grad_(False).eval()
        context.metrics.set("diti_eval_loss", info["eval_loss"])
        context.metrics.set("diti_eval_frozen_loss", info["eval_frozen_loss"])
        if hp["diti_probe_metrics"]:
            rows = slice_probe(model.encoder, ds, context.train_envs, args.trial_seed, args.holdout_fraction,
                               info["end_dims"], backbone.num_train_timesteps, self.config.k, context.device)
            for r in rows:
                if not r["slice"].startswith("t <"):
                    name = r["slice"].replace("t ", "t").replace("-", "_").replace(" ", "")
                    context.metrics.set(f"diti_class_acc_{name}", r["class_acc"])
                    context.metrics.set(f"diti_domain_acc_{name}", r["domain_acc"])
        print(f"DiTi ({self.mode}): encoder {info['key'][:12]} {'reused' if info['reused'] else 'trained'} "
              f"({info['train_seconds']:.1f} s), DiTi loss {info['eval_loss']:.4f} vs frozen "
              f"{info['eval_frozen_loss']:.4f}; head reads z[{feat.start}:{feat.end}]")
        return None

    def configure_optimizer(self, params=None):
        return super().configure_optimizer([p for p in self.parameters() if p.requires_grad] if params is None else params)

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "mode", "finetune") != "finetune":
            self.featurizer.encoder.eval()  # frozen features (GroupNorm keeps no running stats, but say it)
        return self

    def loss(self, minibatches):
        x = torch.cat([x for x, _ in minibatches])
        y = torch.cat([y for _, y in minibatches])
        ce = F.cross_entropy(self.predict(x), y)
        if self.mode != "finetune" or self.objective is None:
            return ce, {}
        feat = self.featurizer
        n = self.hparams["diti_finetune_batch"]
        sub = x[::-(-len(x) // n)] if 0 < n < len(x) else x
        diti, frozen = self.objective.loss(feat.encoder, self.branch, feat.unit(sub))
        return ce + self.hparams["diti_lambda"] * diti, {"ce": ce.detach(), "diti_loss": diti.detach(),
                                                          "diti_frozen_loss": frozen}


@torch.no_grad()
def encode_split(encoder, dataset, envs, trial_seed, holdout_fraction, which, device):
    x, y, d = split_images(dataset, envs, trial_seed, holdout_fraction, which, encoder.resolution)
    z = torch.cat([encoder(as_unit(x[i:i + 256].to(device))).float().cpu() for i in range(0, len(x), 256)])
    return z, y, d


def slice_probe(encoder, dataset, train_envs, trial_seed, holdout_fraction, end_dims, num_timesteps, k, device):
    """Probe rows per time-step slice: fitted on the training domains' in-splits, scored on their out-splits."""
    fit = encode_split(encoder, dataset, train_envs, trial_seed, holdout_fraction, "in", device)
    held = encode_split(encoder, dataset, train_envs, trial_seed, holdout_fraction, "out", device)
    return probe_slices(*fit, *held, stage_slices(end_dims, num_timesteps, k))


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
    store = ModelStore(cache_dir / MODELS_SUBDIR)
    backbone = build_backbone(hp["diffusion_backbone"], dataset=dataset, train_envs=train_envs, test_envs=test_envs,
                              store=store, device=device, trial_seed=trial_seed, holdout_fraction=holdout_fraction,
                              ddpm_steps=hp["ddpm_steps"]).eval()
    model, info = trained_encoder(backbone, dataset, train_envs, test_envs, store=store, trial_seed=trial_seed,
                                  holdout_fraction=holdout_fraction, config=config, device=device)
    rows = slice_probe(model.encoder, dataset, train_envs, trial_seed, holdout_fraction, info["end_dims"],
                       backbone.num_train_timesteps, config.k, device)
    n_fit = sum(len(split_indices(len(dataset.envs[e]), trial_seed, e, holdout_fraction)[1]) for e in train_envs)
    n_held = sum(len(split_indices(len(dataset.envs[e]), trial_seed, e, holdout_fraction)[0]) for e in train_envs)
    print(f"DiTi probe on {dataset.name}, training domains {', '.join(dataset.domains[e] for e in train_envs)} "
          f"(held out: {', '.join(dataset.domains[e] for e in test_envs)}), trial {trial_seed}; "
          f"fit on in-splits ({n_fit}), scored on out-splits ({n_held}); encoder "
          f"{info['key'][:12]}, DiTi loss {info['eval_loss']:.4f} vs frozen {info['eval_frozen_loss']:.4f}")
    print(format_probe_table(rows, dataset.num_classes, len(train_envs)))
    if json_out:
        Path(json_out).write_text(json.dumps({"dataset": dataset.name, "test_envs": list(test_envs),
                                              "trial_seed": trial_seed, "hparams": hp, "rows": rows}, indent=1))
    return rows


@register_algorithm("DiTi-finetune")
class DiTiFinetune(DiTi):
    """DiTi in finetune mode by default (CE + diti_lambda x DiTi loss, encoder trainable, DDPM frozen): its
    own row beside the probe, so the two modes sit in one table."""

    @classmethod
    def hparam_space(cls, space, dataset):
        super().hparam_space(space, dataset)
        space.add("diti_mode", "finetune")
