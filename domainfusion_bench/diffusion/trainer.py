"""Train the small pixel DDPM on the training domains' in-splits only, and cache it.

The weights live in the cached-model store (``diffusion/store.py``) under ``pixel_ddpm/<key>/``, keyed by
(dataset, its domains and sizes, training domains, split, holdout fraction, config). The split is
``shared:0-2`` for trial seeds 0-2 by default (``shared_trials``): one DDPM, trained on the images in the
in-split under every one of those seeds, serves all three trials of a sweep without seeing any of their
validation images; a higher trial seed trains on its own in-split (``trial:<seed>``). The first run
that needs a model trains it (under a file lock, so parallel runs wait instead of training twice) and pays
its ``diffusion_train_seconds``; later runs load it and report the same seconds as ``reused_``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset, WeightedRandomSampler

from domainfusion_bench.diffusion.backbones import PixelDDPMBackbone, PixelDDPMConfig, resize
from domainfusion_bench.diffusion.conditions import LeakageGuard
from domainfusion_bench.diffusion import fitting
from domainfusion_bench.diffusion.store import ModelStore
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.protocol import HOLDOUT_FRACTION, split_indices

FORMAT = 1
# Measured on DigitStyles v2 (32 px RGB, stencil held out, trials 0-2 shared: 676 training images), one CPU
# thread of a busy 2-core machine: DEFAULT_MODEL at batch 32 takes 0.2-0.4 s/step, 5000 steps 920 s. Judged by
# the validity judge (97.9% on real out-split images), 3% of CDGA's img2img outputs (strength 0.5, 10 steps)
# are invalid, and 42% of pure samples at guidance 1 (10% at guidance 2); the previous default (16/32/64 on
# 2x2 patches, 1500 cosine-decay steps) 40% and ~70%. This model ships with the package
# (shipped_models/pixel_ddpm/, datasets/README.md), so runs with stencil held out never train it.
DEFAULT_STEPS = 5000
# trial seeds 0..SHARED_TRIALS-1 share the pixel DDPM and the helper models (validity judge, TGDP's domain
# classifiers and guidance network, the DiTi encoder): each is trained once, on images in the in-split under
# every one of those seeds, so it never sees any of their validation images
SHARED_TRIALS = 3
# the UNet every dataset gets (PixelDDPMConfig's fields; the resolution is set per dataset): 4x4 pixel patches
# folded into channels (an 8x8 grid at 32 px, so wide channels stay cheap), widths 48/96/96, two resnet
# layers per block, self-attention at the lowest resolution; 3.7 M parameters, 0.2 s/step at batch 32 on
# one CPU thread
DEFAULT_MODEL = {"patch_size": 4, "block_out_channels": (48, 96, 96), "layers_per_block": 2, "attention": True}


@dataclass(frozen=True)
class DDPMTrainConfig:
    model: PixelDDPMConfig = field(default_factory=PixelDDPMConfig)
    steps: int = DEFAULT_STEPS
    batch_size: int = 32  # more steps in the same time than 64 (measured on the earlier, smaller UNet)
    lr: float = 1e-3
    warmup_steps: int = 20
    # constant (after warmup) with EMA: the first n steps of a longer run ARE the n-step model, so a long run's
    # snapshots (``snapshot_every``) are each reproducible by ``dfbench diffusion train --steps n``
    lr_schedule: str = "constant"  # "cosine" (warmup, then cosine decay to 0) or "constant" (warmup, then flat)
    # EMA of the weights, used for sampling (diffusers' EMAModel with its warmup: the decay grows as
    # 1 - (1 + step)^-ema_power up to ema_decay, so a short run averages over its last ~10-20 % of steps)
    ema_decay: float = 0.999  # 0: no EMA, sample with the last weights
    ema_power: float = 0.75
    snr_gamma: float = 0.0  # >0: min-SNR-gamma loss weighting (Hang et al. 2023); 0: plain MSE on the target
    cond_dropout: float = 0.1  # per-condition dropout (class and domain separately) for classifier-free guidance
    # share of rows with class AND domain dropped together, on top of cond_dropout (which alone drops both in
    # only cond_dropout^2 = 1% of rows): trains the null condition that "unconditional" sampling, TGDP's pooled
    # source and DiTi's frozen model query. 0 (the default) leaves it out of the config's JSON, and so out of
    # the cache key: the shipped DDPM stays the one a default run asks for
    null_dropout: float = 0.0
    # >0: trial seeds 0..shared_trials-1 share one DDPM, trained on the images that are in the in-split
    # under EVERY one of those seeds (so it never sees any of their validation images); higher trial
    # seeds train on their own in-split. 0: one DDPM per trial seed.
    shared_trials: int = SHARED_TRIALS
    seed: int = 0

    def __post_init__(self):
        if self.lr_schedule not in ("cosine", "constant"):
            raise DfbenchError(f"pixel DDPM lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if not 0 <= self.ema_decay < 1:
            raise DfbenchError(f"pixel DDPM ema_decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")
        if not (0 <= self.cond_dropout < 1 and 0 <= self.null_dropout < 1):
            raise DfbenchError(f"pixel DDPM cond_dropout and null_dropout are shares of rows in [0, 1), got "
                               f"{self.cond_dropout} and {self.null_dropout}")
        if self.shared_trials < 0 or self.snr_gamma < 0:
            raise DfbenchError("pixel DDPM shared_trials and snr_gamma must be >= 0 (0: off)")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_json()
        if not self.null_dropout:
            del d["null_dropout"]  # keeps the key of every model trained before the option existed
        return d


def split_label(trial_seed: int, shared_trials: int) -> str:
    """Which in-split a DDPM trains on: ``shared:0-2`` (the intersection over trial seeds 0..2) or ``trial:5``."""
    if 0 <= trial_seed < shared_trials:
        return f"shared:0-{shared_trials - 1}"
    return f"trial:{trial_seed}"


def shared_identity(trial_seed: int, shared_trials: int = SHARED_TRIALS) -> tuple[int, str]:
    """(the trial seed a cached model is stored under, its split label) for a model of ``trial_seed``."""
    label = split_label(trial_seed, shared_trials)
    return (0 if label.startswith("shared") else trial_seed), label


def held_out_indices(n: int, domain: int, trial_seed: int, holdout_fraction: float, shared_trials: int = 0) -> list[int]:
    """Indices a model of ``training_indices`` never saw and may be scored on: the union of the shared trials'
    out-splits (the trial's own out-split when it is not shared)."""
    if not 0 <= trial_seed < shared_trials:
        return sorted(split_indices(n, trial_seed, domain, holdout_fraction)[0])
    return sorted(set().union(*(split_indices(n, seed, domain, holdout_fraction)[0] for seed in range(shared_trials))))


def training_indices(n: int, domain: int, trial_seed: int, holdout_fraction: float, shared_trials: int = 0) -> list[int]:
    """Indices of domain ``domain`` (``n`` examples) a model for ``trial_seed`` may train on (see ``split_label``)."""
    if not 0 <= trial_seed < shared_trials:
        return sorted(split_indices(n, trial_seed, domain, holdout_fraction)[1])
    keep = set(range(n))
    for seed in range(shared_trials):
        keep &= set(split_indices(n, seed, domain, holdout_fraction)[1])
    return sorted(keep)


def default_config(dataset, steps: int | None = None, **overrides) -> DDPMTrainConfig:
    """The config dfbench uses for ``dataset`` (the CLI and CDGA share it, so they share the cache).

    Small images are modelled at 32 px (28 px MNIST-sized ones are resized), larger ones at 64 px, with
    ``DEFAULT_MODEL``'s UNet (4x4 patches): about 15 CPU-minutes for the default steps at 32 px.
    """
    resolution = 32 if int(dataset.input_shape[-1]) <= 32 else 64
    model_kw = dict(DEFAULT_MODEL, resolution=resolution)
    model_kw.update({k: overrides.pop(k) for k in list(overrides) if k in PixelDDPMConfig.__dataclass_fields__})
    if "block_out_channels" in model_kw:
        model_kw["block_out_channels"] = tuple(model_kw["block_out_channels"])
    unknown = sorted(set(overrides) - set(DDPMTrainConfig.__dataclass_fields__))
    if unknown:
        raise DfbenchError(f"unknown pixel DDPM setting(s) {', '.join(unknown)}. Known: "
                           f"{', '.join(sorted(set(PixelDDPMConfig.__dataclass_fields__) | set(DDPMTrainConfig.__dataclass_fields__) - {'model'}))}")
    config = DDPMTrainConfig(model=PixelDDPMConfig(**model_kw), **overrides)
    return replace(config, steps=steps) if steps is not None else config


class SplitImages(Dataset):
    """(image in [0, 1] at ``resolution``, class, domain) for the given indices of each domain, in the order of
    ``indices`` (domain -> its indices): the one reader of split images for the DDPM and the helper models."""

    def __init__(self, dataset, indices: dict[int, Sequence[int]], resolution: int):
        self.dataset, self.resolution = dataset, resolution
        self.channels = int(dataset.input_shape[0])
        self.items: list[tuple[int, int]] = [(env, int(i)) for env, idx in indices.items() for i in idx]
        self.index_record: dict[str, list[int]] = {dataset.domains[env]: list(idx) for env, idx in indices.items()}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        env, i = self.items[k]
        x, y = self.dataset.envs[env][i]
        return resize(self.dataset.item_to_unit(x).unsqueeze(0), self.resolution).squeeze(0), int(y), env

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """All items as tensors when every domain is a TensorDataset (the embedded/MNIST fast path)."""
        envs = {e for e, _ in self.items}
        if not all(isinstance(self.dataset.envs[e], TensorDataset) for e in envs):
            return None
        xs, ys, ds = [], [], []
        for env in sorted(envs):
            idx = torch.tensor([i for e, i in self.items if e == env], dtype=torch.long)
            x, y = self.dataset.envs[env].tensors[:2]
            xs.append(resize(x[idx].float() / (255.0 if x.dtype == torch.uint8 else 1.0), self.resolution))
            ys.append(y[idx].long())
            ds.append(torch.full((len(idx),), env, dtype=torch.long))
        return torch.cat(xs), torch.cat(ys), torch.cat(ds)

    def all_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``tensors()``, or every item read and stacked when a domain is not a TensorDataset."""
        tensors = self.tensors()
        if tensors is None:
            items = [self[k] for k in range(len(self))]
            tensors = (torch.stack([x for x, _, _ in items]), torch.tensor([y for _, y, _ in items], dtype=torch.long),
                       torch.tensor([d for _, _, d in items], dtype=torch.long))
        return tensors


class InSplitImages(SplitImages):
    """``SplitImages`` of the in-splits of ``train_envs`` only (see ``training_indices``)."""

    def __init__(self, dataset, train_envs: Sequence[int], trial_seed: int, holdout_fraction: float, resolution: int,
                 shared_trials: int = 0):
        super().__init__(dataset, {env: training_indices(len(dataset.envs[env]), env, trial_seed, holdout_fraction,
                                                         shared_trials) for env in train_envs}, resolution)


def _domain_weights(domains: torch.Tensor) -> torch.Tensor:
    """Per item, 1 / (its domain's size): draws with these weights see every domain equally often."""
    return 1.0 / torch.bincount(domains)[domains].double()


def _batches(data: SplitImages, config: DDPMTrainConfig, workers: int,
             balanced: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless training batches, drawn with replacement (``balanced``: each domain equally often)."""
    g = torch.Generator().manual_seed(config.seed)
    tensors = data.tensors()
    if tensors is not None:
        x, y, d = tensors
        weights = _domain_weights(d) if balanced else None
        while True:
            i = (torch.randint(len(x), (config.batch_size,), generator=g) if weights is None
                 else torch.multinomial(weights, config.batch_size, replacement=True, generator=g))
            yield x[i], y[i], d[i]
    n = config.steps * config.batch_size
    if balanced:
        weights = _domain_weights(torch.tensor([env for env, _ in data.items]))
        sampler = WeightedRandomSampler(weights, n, replacement=True, generator=g)
    else:
        sampler = RandomSampler(data, replacement=True, num_samples=n, generator=g)
    loader = DataLoader(data, batch_size=config.batch_size, sampler=sampler, num_workers=workers, drop_last=True)
    yield from loader


@dataclass
class TrainedDDPM:
    backbone: PixelDDPMBackbone
    key: str
    path: Path
    train_seconds: float
    reused: bool


def ddpm_where(dataset, train_envs: Sequence[int], trial_seed: int, holdout_fraction: float,
               config: DDPMTrainConfig) -> dict[str, Any]:
    """The store identity fields of the DDPM for these training domains (``ModelStore.identity(**...)``).
    Trial seeds that share a model share its identity: the store's (integer) trial seed is the first shared
    one, and the config records which split it is."""
    split = split_label(trial_seed, config.shared_trials)
    return dict(dataset=dataset, train_envs=sorted(int(e) for e in train_envs), holdout_fraction=holdout_fraction,
                trial_seed=0 if split.startswith("shared") else trial_seed, config={**config.to_json(), "split": split})


def train_pixel_ddpm(dataset, train_envs: Sequence[int], test_envs: Sequence[int], *, trial_seed: int = 0,
                     holdout_fraction: float = HOLDOUT_FRACTION, config: DDPMTrainConfig | None = None,
                     cache_dir: str | Path | None = None, store: ModelStore | None = None,
                     device: str | torch.device = "cpu", progress: bool = True, costs=None, workers: int | None = None,
                     allow_condition_on_held_out: bool = False, made_by: str | None = None,
                     snapshot_every: int = 0, snapshot_dir: str | Path | None = None) -> TrainedDDPM:
    """Load the cached DDPM for these training domains, or train it on their in-splits, through the
    cached-model store (``store``, or one at ``cache_dir``).

    The returned backbone is already restricted to ``test_envs`` (the leakage guard is installed).
    ``costs`` gets ``diffusion_train_seconds``, and ``reused_diffusion_train_seconds`` when the weights
    were made by someone other than ``made_by`` (a resumed run paid for the model it trained itself).
    ``snapshot_every`` > 0 also saves the (EMA) weights every that many steps under ``snapshot_dir/step_<n>``:
    with ``lr_schedule="constant"`` the snapshot at step n is the model a run with ``steps=n`` makes.
    """
    guard = LeakageGuard(dataset.name, dataset.domains, test_envs)
    train_envs = sorted(int(e) for e in train_envs)
    if not train_envs:
        raise DfbenchError("a diffusion model needs at least one training domain")
    guard.check_train(train_envs)
    config = config or default_config(dataset)
    if store is None:
        if cache_dir is None:
            raise DfbenchError("train_pixel_ddpm needs a cache_dir or a ModelStore")
        store = ModelStore(cache_dir)
    split = split_label(trial_seed, config.shared_trials)
    where = ddpm_where(dataset, train_envs, trial_seed, holdout_fraction, config)
    key = store.key_of(store.identity("pixel_ddpm", **where))
    device = torch.device(device)

    def build() -> PixelDDPMBackbone:
        torch.manual_seed(config.seed)
        info = {"train_envs": train_envs, "split": split, "holdout_fraction": holdout_fraction,
                "train_config": config.to_json()}
        return PixelDDPMBackbone.create(config.model, dataset=dataset.name, domains=dataset.domains,
                                        classes=dataset.classes, image_channels=int(dataset.input_shape[0]),
                                        seen_domains=train_envs, key=key, info=info).to(device)

    def fit(backbone: PixelDDPMBackbone) -> dict:
        _train(backbone, dataset, train_envs, trial_seed, holdout_fraction, config, device, progress, workers,
               snapshot_every, snapshot_dir)
        backbone.info["made_by"] = made_by
        return {k: backbone.info[k] for k in ("final_loss", "trained_on")}

    entry = store.get_or_train("pixel_ddpm", **where, build=build, train=fit, guard=guard, costs=costs,
                               made_by=made_by, device=device, cost_name="diffusion_train_seconds",
                               save=lambda backbone, path: backbone.save(path),
                               load=_load_backbone)
    backbone = entry.module
    if backbone.key != key:
        raise DfbenchError(f"cached DDPM at {entry.path} has key {backbone.key[:12]}, expected {key[:12]}; delete the folder")
    backbone.restrict(test_envs, allow_condition=allow_condition_on_held_out)
    return TrainedDDPM(backbone, key, entry.path, entry.train_seconds, entry.reused)


def _load_backbone(path: Path, device) -> PixelDDPMBackbone:
    """A saved DDPM; float32 however its tensors were stored (a shipped model keeps them as float16)."""
    backbone = PixelDDPMBackbone.load(path, device)
    backbone.model.float()
    return backbone


def _snapshot(backbone: PixelDDPMBackbone, ema, path: Path, steps: int, start: float, losses: list[float]) -> None:
    """Save the weights sampling would use after ``steps`` steps (the EMA's when there is one)."""
    params = list(backbone.model.parameters())
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    info = dict(backbone.info)
    backbone.info.update(steps_done=steps, train_seconds=time.perf_counter() - start, final_loss=fitting.tail_mean(losses))
    try:
        backbone.save(path)
    finally:
        backbone.info = info
        if ema is not None:
            ema.restore(params)


def _train(backbone: PixelDDPMBackbone, dataset, train_envs, trial_seed, holdout_fraction, config: DDPMTrainConfig,
           device, progress, workers, snapshot_every: int = 0, snapshot_dir: str | Path | None = None,
           data: SplitImages | None = None, balanced: bool = False) -> None:
    """Fit ``backbone`` in place on the in-splits of ``train_envs`` (or on ``data``; ``balanced``: each domain
    drawn equally often), optionally saving EMA snapshots."""
    from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    if data is None:
        data = InSplitImages(dataset, train_envs, trial_seed, holdout_fraction, config.model.resolution, config.shared_trials)
    backbone.info["trained_on"] = {
        d: {"n": len(idx), "indices_sha": hashlib.sha256(json.dumps(sorted(idx)).encode()).hexdigest()[:16]}
        for d, idx in data.index_record.items()}
    model = backbone.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    if config.lr_schedule == "cosine":
        lr_schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    else:
        lr_schedule = get_constant_schedule_with_warmup(optimizer, config.warmup_steps)
    ema = (EMAModel(model.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=config.ema_power)
           if config.ema_decay > 0 else None)
    abar = backbone.alphas_cumprod.to(device) if config.snr_gamma > 0 else None
    n_domains, T = len(dataset.domains), backbone.num_train_timesteps
    g = torch.Generator().manual_seed(config.seed + 1)
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    batches = _batches(data, config, workers, balanced)

    def loss_fn(step: int) -> torch.Tensor:
        x, y, d = (v.to(device) for v in next(batches))
        b = len(x)
        noise = torch.randn(x.shape, generator=g).to(device)
        t = torch.randint(0, T, (b,), generator=g).to(device)
        z_t = backbone.add_noise(x * 2 - 1, noise, t)
        drop_class = (torch.rand(b, generator=g) < config.cond_dropout).to(device)
        drop_domain = (torch.rand(b, generator=g) < config.cond_dropout).to(device)
        if config.null_dropout > 0:  # drawn only when on: a default run's random stream is what it always was
            both = (torch.rand(b, generator=g) < config.null_dropout).to(device)
            drop_class, drop_domain = drop_class | both, drop_domain | both
        y = torch.where(drop_class, torch.full_like(y, -1), y)
        w = F.one_hot(d, n_domains).float() * (~drop_domain).float().unsqueeze(1)
        with autocast:
            out = model(z_t, t, y, w)
        target = noise if config.model.prediction == "epsilon" else x * 2 - 1
        if abar is None:
            return F.mse_loss(out.float(), target)
        # min-SNR-gamma: weight min(snr, gamma) on x0 error = min(1, gamma / snr) on eps error
        snr = abar[t] / (1 - abar[t])
        weight = torch.minimum(snr, torch.full_like(snr, config.snr_gamma))
        weight = weight if config.model.prediction == "sample" else weight / snr
        return ((out.float() - target) ** 2).mean(dim=(1, 2, 3)).mul(weight).mean()

    def snapshot(step: int, losses: list[float]) -> None:
        if snapshot_every > 0 and snapshot_dir is not None and (step + 1) % snapshot_every == 0:
            _snapshot(backbone, ema, Path(snapshot_dir) / f"step_{step + 1}", step + 1, start, losses)

    start = time.perf_counter()
    losses = fitting.fit(model.parameters(), loss_fn, steps=config.steps, optimizer=optimizer, schedule=lr_schedule, clip=1.0,
                         ema=ema, on_step=snapshot, progress=progress,
                         desc=f"pixel DDPM {dataset.name} on {','.join(dataset.domains[e] for e in train_envs)}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    if ema is not None:
        ema.copy_to(model.parameters())
    backbone.info.update(train_seconds=time.perf_counter() - start, final_loss=fitting.tail_mean(losses),
                         device=str(device), created=time.time())
    model.eval()
