"""The ``Backbone`` interface: noise-schedule algebra, the one eps conversion, conditioning and the leakage guard."""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from domainfusion_bench.diffusion.conditions import Condition, LeakageGuard, domain_weights
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.registry import Registry

BACKBONES: Registry[type["Backbone"]] = Registry("diffusion backbone")


def resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def parameters_digest(*modules: nn.Module) -> str:
    """Content hash of modules' parameters and buffers (for small models built in memory)."""
    h = hashlib.sha256()
    for module in modules:
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Backbone:
    """Base class; subclasses implement ``encode``, ``decode``, ``_predict`` (the network's raw output,
    of type ``prediction_type``) and ``_embed``."""

    kind = "backbone"

    def __init__(self, *, dataset: str, domains: Sequence[str], classes: Sequence[str], image_channels: int,
                 resolution: int, scheduler, key: str, seen_domains=(), info: dict[str, Any] | None = None):
        from diffusers import DDPMScheduler

        self.dataset = dataset
        self.domains = list(domains)
        self.classes = list(classes)
        self.image_channels = image_channels
        self.resolution = resolution
        self.train_scheduler = scheduler if isinstance(scheduler, DDPMScheduler) else DDPMScheduler.from_config(scheduler.config)
        self.key = key
        self.seen_domains = frozenset(int(d) for d in seen_domains)
        self.info = dict(info or {})
        self.guard = LeakageGuard(dataset, self.domains)
        self.device = torch.device("cpu")

    # --- the noise schedule -------------------------------------------------------------------
    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha-bar_t for t = 0..T-1 (float32, on the backbone's device)."""
        return self.train_scheduler.alphas_cumprod.to(self.device, torch.float32)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.train_scheduler.config.num_train_timesteps)

    def abar(self, t: torch.Tensor | int, dims: int | None = None) -> torch.Tensor:
        """alpha-bar at timesteps ``t`` (an int or [B]) as [B, 1, ..., 1] with ``dims`` dimensions in all
        (default: a latent batch's, 1 + len(latent_shape())), on the backbone's device."""
        t = torch.as_tensor(t, device=self.device).long().reshape(-1)
        dims = 1 + len(self.latent_shape()) if dims is None else dims
        return self.alphas_cumprod[t].view(-1, *[1] * (dims - 1))

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.abar(t, z0.dim())
        return abar.sqrt() * z0 + (1 - abar).sqrt() * noise

    def x0_from_eps(self, z_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        abar = self.abar(t, z_t.dim())
        return (z_t.float() - (1 - abar).sqrt() * eps) / abar.sqrt()

    def eps_from_x0(self, z_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        abar = self.abar(t, z_t.dim())
        return (z_t.float() - abar.sqrt() * x0) / (1 - abar).sqrt()

    def eps_from_v(self, z_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        # v = sqrt(abar) eps - sqrt(1 - abar) x0 and z_t = sqrt(abar) x0 + sqrt(1 - abar) eps
        abar = self.abar(t, z_t.dim())
        return abar.sqrt() * v + (1 - abar).sqrt() * z_t.float()

    @property
    def prediction_type(self) -> str:
        """What the network outputs, in diffusers' terms: epsilon | v_prediction | sample."""
        return str(self.train_scheduler.config.get("prediction_type", "epsilon"))

    def to_eps(self, out: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The one place a network's raw output becomes the noise."""
        kind = self.prediction_type
        if kind == "epsilon":
            return out
        if kind == "sample":
            return self.eps_from_x0(z_t, out, t)
        if kind == "v_prediction":
            return self.eps_from_v(z_t, out, t)
        raise DfbenchError(f"{self.kind} backbone: unknown prediction_type {kind!r} (epsilon, v_prediction or sample)")

    def inference_scheduler(self):
        """A fresh DDIM scheduler on this backbone's noise schedule (schedulers are stateful). It is told
        ``prediction_type="epsilon"`` because samplers hand it ``eps`` (already converted)."""
        from diffusers import DDIMScheduler

        # set_alpha_to_one: the last step lands on alpha-bar 1, so the final latent is the clean x0 prediction
        return DDIMScheduler.from_config(self.train_scheduler.config, **{**self.ddim_overrides(),
                                                                         "prediction_type": "epsilon",
                                                                         "set_alpha_to_one": True})

    def ddim_overrides(self) -> dict[str, Any]:
        return {}

    # --- leakage guard --------------------------------------------------------------------------
    def restrict(self, held_out, allow_condition: bool = False, few_shot_target: int = 0,
                 oracle_out_split: bool = False) -> "Backbone":
        """Install a run's guard: held-out domains may never be conditioned on (unless oracle) or started from
        (``few_shot_target``, ``oracle_out_split``: see ``LeakageGuard``)."""
        guard = LeakageGuard(self.dataset, self.domains, held_out, allow_condition, few_shot_target, oracle_out_split)
        guard.check_seen(self.seen_domains, f"the {self.kind} backbone {self.key[:12]}")
        self.guard = guard
        return self

    # --- conditioning ---------------------------------------------------------------------------
    def condition(self, class_ids=None, domains=None, prompts: Sequence[str] | None = None,
                  extra: torch.Tensor | None = None, batch: int | None = None) -> Condition:
        """Build a checked condition. ``class_ids``: ints (-1 = none) or None; ``domains``: see
        ``conditions.domain_weights`` (an id, ids, a [B, D] weight tensor or {domain: weight} dicts)."""
        if class_ids is None:
            n = batch if batch is not None else (len(prompts) if prompts is not None else len(domains))
            class_ids = torch.full((n,), -1, dtype=torch.long)
        class_ids = torch.as_tensor(class_ids, dtype=torch.long).flatten().cpu()
        n = len(class_ids)
        if ((class_ids < -1) | (class_ids >= len(self.classes))).any():
            raise DfbenchError(f"class ids must be in -1..{len(self.classes) - 1}, got {class_ids.tolist()}")
        weights = domain_weights(domains, n, len(self.domains))
        self.guard.check_condition(weights)
        if prompts is not None:
            if len(prompts) != n:
                raise DfbenchError(f"got {len(prompts)} prompts for a batch of {n}")
            self.guard.check_text(prompts, "a prompt")
        if extra is not None and (extra.dim() != 2 or len(extra) != n):
            raise DfbenchError(f"extra condition must be [batch, features] = [{n}, E], got {tuple(extra.shape)}")
        # extra stays in the autograd graph (a trainable encoder may produce it); .to() below keeps the graph
        cond = Condition(class_ids, weights, list(prompts) if prompts is not None else None,
                         extra=None if extra is None else extra.float())
        return self._embed(cond).to(self.device)

    def null_condition(self, n: int) -> Condition:
        return self.condition(torch.full((n,), -1, dtype=torch.long), None,
                              prompts=[""] * n if self.uses_prompts else None)

    uses_prompts = False

    def _embed(self, cond: Condition) -> Condition:
        return cond

    # --- the model ------------------------------------------------------------------------------
    def latent_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def eps(self, z_t: torch.Tensor, t: torch.Tensor | int, cond: Condition) -> torch.Tensor:
        """The predicted noise at ``z_t`` (float32), whatever the network's prediction type."""
        t = torch.as_tensor(t, device=z_t.device)
        if t.dim() == 0:
            t = t.expand(len(z_t))
        return self.to_eps(self._predict(z_t, t, cond).float(), z_t, t)

    def _predict(self, z_t, t, cond) -> torch.Tensor:
        raise NotImplementedError

    def modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def to(self, device) -> "Backbone":
        self.device = torch.device(device)
        for m in self.modules().values():
            m.to(self.device)
        return self

    def eval(self, freeze: bool = True, trainable_extra: bool = False) -> "Backbone":
        """Eval mode; ``freeze`` turns off the backbone's own parameters' gradients (inputs such as ``z_t``,
        images given to ``encode`` and ``Condition.extra`` still get theirs). ``trainable_extra`` keeps the
        extra-condition projection (``extra_parameters()``) trainable, e.g. for DiTi's feature conditioning."""
        for m in self.modules().values():
            m.eval()
            if freeze:
                m.requires_grad_(False)
        if trainable_extra:
            for p in self.extra_parameters():
                p.requires_grad_(True)
        return self

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters that map ``Condition.extra`` into the model (none if it takes no extra)."""
        return []

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "dataset": self.dataset,
                "seen_domains": [self.domains[d] for d in sorted(self.seen_domains)], **self.info}
