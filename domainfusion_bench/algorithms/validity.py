"""The validity oracle every generative method is judged by: a small classifier trained on the real
training-domain in-splits only (a cached helper model; its accuracy on the training-domain out-splits is
``metric_oracle_val_acc``). A generated image is invalid when the oracle's probability of its intended class
is below ``og_threshold``; ``metric_invalid_rate`` is the invalid share of what a run generated for training.
Oracle-assisted guidance (``oracle_guidance.py``) steers generation away from such images.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from domainfusion_bench.diffusion.backbones import Backbone, resize
from domainfusion_bench.diffusion.oracle_guidance import ClassifierOracle, check_threshold
from domainfusion_bench.diffusion.trainer import SHARED_TRIALS, InSplitImages, held_out_indices, shared_identity
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.protocol import seed_hash

ORACLE_KIND = "oracle_classifier"


def oracle_hparams(space) -> None:
    """What every generative method shares: judging its generations with the validity oracle."""
    space.add("og_measure", True)  # judge every generated image: metric_invalid_rate in the records
    space.add("og_threshold", 0.5)  # valid iff p_oracle(intended class) >= threshold
    space.add("og_oracle_width", 16)
    space.add("og_oracle_steps", 1500)  # DigitStyles v2: 78% out-split accuracy (400 steps: 39%); once per training domains and trial
    space.add("og_oracle_lr", 3e-3)


# ------------------------------------------------------------------------------------------------
# The oracle classifier
# ------------------------------------------------------------------------------------------------

class OracleNet(nn.Module):
    """A small CNN on images in [0, 1]: three conv stages (the last two stride 2), global pooling, linear."""

    def __init__(self, channels: int, num_classes: int, width: int = 16):
        super().__init__()
        w = int(width)
        self.body = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.GroupNorm(min(8, w), w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(min(8, 2 * w), 2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(min(8, 2 * w), 2 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.float() * 2 - 1))


def _images(dataset, env: int, indices: Sequence[int], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for i in indices:
        x, y = dataset.envs[env][int(i)]
        xs.append(resize(dataset.item_to_unit(x).unsqueeze(0), resolution))
        ys.append(int(y))
    return (torch.cat(xs) if xs else torch.zeros(0)), torch.tensor(ys, dtype=torch.long)


def oracle_classifier(context, resolution: int, hparams: dict[str, Any], guard=None, charge: bool = True):
    """The cached oracle (trained on the training domains' in-splits only) and its store entry.

    Trials 0-2 share one oracle, as they share the DDPM: it trains on the images in the in-split under all
    three seeds, and its accuracy, ``entry.info["val_acc"]``, is measured on the union of their out-splits."""
    ds, args = context.dataset, context.args
    channels = int(ds.input_shape[0])
    store_seed, split = shared_identity(args.trial_seed)
    config = {"arch": "OracleNet", "width": int(hparams["og_oracle_width"]), "steps": int(hparams["og_oracle_steps"]),
              "lr": float(hparams["og_oracle_lr"]), "batch_size": 64, "resolution": int(resolution), "split": split}
    if config["steps"] < 1:
        raise DfbenchError(f"og_oracle_steps must be >= 1, got {config['steps']}")

    def train(net: nn.Module) -> dict[str, Any]:
        data = InSplitImages(ds, context.train_envs, args.trial_seed, args.holdout_fraction, resolution, SHARED_TRIALS)
        tensors = data.tensors()
        if tensors is None:
            items = [data[k] for k in range(len(data))]
            x, y = torch.stack([a for a, _, _ in items]), torch.tensor([b for _, b, _ in items])
        else:
            x, y, _ = tensors
        device = next(net.parameters()).device
        g = torch.Generator().manual_seed(seed_hash("oracle", store_seed))
        opt = torch.optim.Adam(net.parameters(), lr=config["lr"], foreach=True)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, config["lr"], total_steps=config["steps"])
        net.train()
        for step in range(config["steps"]):
            idx = torch.randint(len(x), (config["batch_size"],), generator=g)
            loss = F.cross_entropy(net(x[idx].to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0:
                context.heartbeat()
        net.eval()
        correct = total = 0
        with torch.no_grad():
            for env in context.train_envs:
                out_idx = held_out_indices(len(ds.envs[env]), env, args.trial_seed, args.holdout_fraction, SHARED_TRIALS)
                vx, vy = _images(ds, env, out_idx, resolution)
                for start in range(0, len(vx), 256):
                    pred = net(vx[start:start + 256].to(device)).argmax(1).cpu()
                    correct += int((pred == vy[start:start + 256]).sum())
                total += len(vx)
        return {"val_acc": correct / max(1, total), "n_val": total, "n_train": len(x)}

    entry = context.models.get_or_train(
        ORACLE_KIND, dataset=ds, train_envs=context.train_envs, trial_seed=store_seed,
        holdout_fraction=args.holdout_fraction, config=config, build=lambda: OracleNet(channels, ds.num_classes, config["width"]),
        train=train, costs=context.costs if charge else None, made_by=context.made_by, device=context.device, guard=guard)
    return entry


# ------------------------------------------------------------------------------------------------
# The mixin
# ------------------------------------------------------------------------------------------------

def run_oracle(algorithm, context, backbone: Backbone) -> ClassifierOracle:
    """The run's validity oracle (cached helper model; ``metric_oracle_val_acc`` records its accuracy)."""
    cached = getattr(algorithm, "_og_oracle", None)
    if cached is None:
        hp = algorithm.hparams
        entry = oracle_classifier(context, backbone.resolution, hp, guard=backbone.guard)
        context.metrics.set("oracle_val_acc", entry.info.get("val_acc", float("nan")))
        cached = ClassifierOracle(entry.module, check_threshold(hp["og_threshold"]), device=context.device,
                                  preprocess=lambda x: resize(x, backbone.resolution))
        cached.key = entry.key
        algorithm._og_oracle = cached
    return cached


def judge_generation(algorithm, context, images: torch.Tensor, labels: torch.Tensor, env: int,
                     round_name: str = "base") -> float:
    """Judge generated images with the oracle; ``metric_invalid_rate`` = the invalid share of everything
    generated for training so far (every generative method records it, guided or not)."""
    backbone = algorithm.backbone(context)
    oracle = run_oracle(algorithm, context, backbone)
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    start = time.perf_counter()
    valid = oracle(x, labels)
    context.costs.add("og_oracle_seconds", time.perf_counter() - start)
    tally = getattr(algorithm, "_og_tally", {})
    tally[(round_name, int(env))] = (len(valid), int((~valid).sum()))
    algorithm._og_tally = tally
    n = sum(a for (r, _), (a, _) in tally.items() if r == round_name)
    bad = sum(b for (r, _), (_, b) in tally.items() if r == round_name)
    algorithm._og_rate = bad / n
    context.metrics.set("invalid_rate", bad / n)
    return bad / n
