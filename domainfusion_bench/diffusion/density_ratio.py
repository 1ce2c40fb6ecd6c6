"""Density-ratio guidance (TGDP: Ouyang et al., "Transfer Learning for Diffusion Models", NeurIPS 2024).

A diffusion model of a *source* distribution p is steered toward a *target* q with

    grad log q_t(z_t) = grad log p_t(z_t) + grad log h*(z_t, t),   h*(z_t, t) = E_p[q(z_0)/p(z_0) | z_t] = q_t / p_t

Parts, each generic over the data shape (2-D points ``[B, d]`` or images ``[B, C, H, W]``):

1. ``DomainClassifier`` c(z_0): K heads, head k separates target set k from the source set. It is
   trained with a class-balanced loss (each side's mean BCE), i.e. the plain BCE on n_s source and
   n_t target samples reweighted by n_t/n_s, so the paper's ratio r = c/(1-c) * n_source/n_target
   becomes r = c/(1-c) = exp(logit) (``prior_factor`` records the factor, 1 here).
2. ``GuidanceNet`` h_psi(z_t, t[, y]) >= 0 (softplus), K outputs, regressed on **source** samples onto
   r(z_0) with ||h - r||^2 (not log r: the optimum of the squared loss is E[r | z_t] = h*, while a
   regression of log r would give E[log r | z_t], which is not log h*).
   Optional regularisers: *consistency* = the denoising loss of the guided noise estimate on target
   samples (second-order: the loss differentiates through grad log h, so create_graph=True);
   *cycle* = ||h(z'_t, t) - c'/(1-c')||^2 with a time-conditioned domain classifier c'(z_t, t) trained
   on noised source vs noised target samples (c' here is P(target), so c'/(1-c') is the DESIGN's
   (1-c')/c' with c' = P(source)).
3. ``DensityRatioGuidance``: the GuidanceTerm whose ``grad_log`` is grad log h (of one head, or of a
   convex mix sum_k a_k h_k: by linearity that is the ratio of the mixture target sum_k a_k q_k).
   The sampler applies eps_guided = eps - sqrt(1 - abar_t) * w * grad log h (samplers.guided_eps).

Class conditioning: h takes a class id (-1 = none; trained with class dropout so both exist). The
class-conditional ratio q(z|y)/p(z|y) is r(z) times a per-class constant when p(y|z) = q(y|z); the
constant drops out of grad log h, so the unconditional c(z_0) serves the class-conditional h.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from domainfusion_bench.diffusion.conditions import Condition
from domainfusion_bench.diffusion.fitting import fit
from domainfusion_bench.diffusion.samplers import GuidanceTerm
from domainfusion_bench.errors import DfbenchError


@dataclass(frozen=True)
class DensityRatioConfig:
    """Helper-model settings. Defaults fit the demo budget (tiny nets, a few seconds each on a CPU core)."""

    width: int = 64  # hidden units (MLP) / channels (CNN)
    batch_size: int = 128
    classifier_steps: int = 300
    classifier_lr: float = 2e-3
    classifier_weight_decay: float = 1e-3  # ours: few target samples, keep c smooth
    max_log_ratio: float = 6.0  # ours: |log r| clipped (r in [e^-6, e^6]); a saturated classifier gives 0/inf
    h_steps: int = 600
    h_lr: float = 2e-3
    # ours: h's regression draws t = T u^p. Any t-distribution keeps the optimum E[r | z_t, t]; p > 1 spends
    # the steps where h is sharp (low noise) instead of high t, where r(z_0) given z_t is nearly pure noise
    h_time_power: float = 2.0
    class_dropout: float = 0.2  # ours: share of h's training rows with the class hidden (trains the y = -1 head)
    consistency_weight: float = 0.0  # paper: optional; off by default (doubles h's training cost)
    cycle_weight: float = 0.0  # paper: optional; off by default (needs the time-conditioned classifier)
    time_classifier_steps: int = 300
    seed: int = 0

    def to_json(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# Networks
# ------------------------------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t, cos first: [B, dim] (diffusers' own embedding)."""
    from diffusers.models.embeddings import get_timestep_embedding

    return get_timestep_embedding(t.view(-1), dim, flip_sin_to_cos=True, downscale_freq_shift=0, max_period=max_period)


class RatioNet(nn.Module):
    """x [B, *shape] (+ t, + class id) -> [B, outputs]. MLP for vectors, a small CNN for images.

    Time and class enter as an embedding added to the hidden features (after the first layer).
    """

    def __init__(self, shape: Sequence[int], outputs: int = 1, *, time: bool = False, num_classes: int = 0,
                 width: int = 64):
        super().__init__()
        self.shape, self.outputs, self.width = tuple(int(s) for s in shape), outputs, width
        self.num_classes = num_classes
        if len(self.shape) == 1:
            self.layers = nn.ModuleList([nn.Linear(self.shape[0], width), nn.Linear(width, width), nn.Linear(width, width)])
            self.pool = nn.Identity()
        elif len(self.shape) == 3:
            c = self.shape[0]
            self.layers = nn.ModuleList([nn.Conv2d(c, width // 2, 3, padding=1),
                                         nn.Conv2d(width // 2, width, 3, stride=2, padding=1),
                                         nn.Conv2d(width, width, 3, stride=2, padding=1)])
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        else:
            raise DfbenchError(f"density-ratio nets take vectors [d] or images [C, H, W], got shape {self.shape}")
        # time and class embeddings are added to every hidden layer (a fine function of (x, t) needs it)
        dims = [m.out_features if isinstance(m, nn.Linear) else m.out_channels for m in self.layers]
        self.dims = dims
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, sum(dims))) if time else None
        self.classes = nn.Embedding(num_classes + 1, sum(dims)) if num_classes else None
        self.head = nn.Linear(width, outputs)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = None
        if self.time is not None:
            if t is None:
                raise DfbenchError("this network is time-conditioned: pass t")
            emb = self.time(timestep_embedding(t.to(x.device), self.width))
        if self.classes is not None:
            ids = torch.full((len(x),), -1, device=x.device, dtype=torch.long) if y is None else y.to(x.device).long()
            ids = torch.where(ids < 0, torch.full_like(ids, self.num_classes), ids)
            emb = self.classes(ids) if emb is None else emb + self.classes(ids)
        a = x.float()
        parts = emb.split(self.dims, dim=1) if emb is not None else [None] * len(self.layers)
        for layer, e in zip(self.layers, parts):
            a = layer(a)
            if e is not None:
                a = a + (e.view(*e.shape, 1, 1) if a.dim() == 4 else e)
            a = F.silu(a)
        return self.head(self.pool(a))


class DomainClassifier(nn.Module):
    """c(z_0) (or c'(z_t, t) with ``time=True``): K logits, head k = log-odds of target k vs source."""

    def __init__(self, shape, targets: int = 1, *, time: bool = False, width: int = 64, max_log_ratio: float = 6.0):
        super().__init__()
        self.net = RatioNet(shape, targets, time=time, width=width)
        self.max_log_ratio = max_log_ratio
        self.register_buffer("prior_factor", torch.ones(targets))  # n_source/n_target weighting of the loss (1: balanced)

    def forward(self, z: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(z, t)

    def log_ratio(self, z: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """log r = log c/(1-c) + log(n_source/n_target) per head, clipped to +-max_log_ratio: [B, K]."""
        out = self(z, t) + self.prior_factor.log()
        return out.clamp(-self.max_log_ratio, self.max_log_ratio)

    def ratio(self, z: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.log_ratio(z, t).exp()


class GuidanceNet(nn.Module):
    """h_psi(z_t, t[, y]) >= 0 with K outputs (one per target); softplus keeps it positive."""

    def __init__(self, shape, targets: int = 1, *, num_classes: int = 0, width: int = 64):
        super().__init__()
        self.net = RatioNet(shape, targets, time=True, num_classes=num_classes, width=width)
        self.outputs, self.num_classes = targets, num_classes

    def raw(self, z_t, t, y=None) -> torch.Tensor:
        return self.net(z_t, t, y)

    def forward(self, z_t, t, y=None) -> torch.Tensor:
        return F.softplus(self.raw(z_t, t, y))

    def log_h(self, z_t, t, y=None, mix: torch.Tensor | None = None) -> torch.Tensor:
        """log h of each head [B, K], or of the mix sum_k a_k h_k ([B]) when ``mix`` ([K] or [B, K]) is given."""
        a = self.raw(z_t, t, y)
        # log softplus(a), stable for very negative a (softplus(a) ~ e^a there)
        log_h = torch.where(a < -20, a, F.softplus(a).clamp_min(1e-30).log())
        if mix is None:
            return log_h
        mix = mix.to(a).expand_as(a)
        return torch.logsumexp(log_h + mix.clamp_min(1e-30).log(), dim=1)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def _noised(z0: torch.Tensor, abar: torch.Tensor, g: torch.Generator, power: float = 1.0):
    """z_t at t = floor(T u^power), u ~ U[0, 1) (power 1: uniform; > 1: more low-noise draws)."""
    T = len(abar)
    t = (T * torch.rand(len(z0), generator=g) ** power).long().clamp_(0, T - 1)
    noise = torch.randn(z0.shape, generator=g)
    a = abar[t].view(-1, *[1] * (z0.dim() - 1))
    return a.sqrt() * z0 + (1 - a).sqrt() * noise, t, noise


def _draw(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(n, (size,), generator=g)


def train_domain_classifier(model: DomainClassifier, source: torch.Tensor, targets: Sequence[torch.Tensor], *,
                            config: DensityRatioConfig = DensityRatioConfig(), abar: torch.Tensor | None = None,
                            device="cpu", heartbeat: Callable[[], None] | None = None) -> dict:
    """Fit head k to separate ``targets[k]`` from ``source`` with a class-balanced BCE.

    ``abar`` given (a time-conditioned c'): both sides are noised to a random t first. Returns info:
    per-head balanced accuracy on the training sets, sizes, seconds.
    """
    if len(targets) != model.net.outputs:
        raise DfbenchError(f"the domain classifier has {model.net.outputs} heads but got {len(targets)} target sets")
    if len(source) == 0 or any(len(t) == 0 for t in targets):
        raise DfbenchError("domain classifier: the source and every target set need at least one sample")
    time_cond = abar is not None
    g = torch.Generator().manual_seed(config.seed + (17 if time_cond else 0))
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.classifier_lr, weight_decay=config.classifier_weight_decay)
    steps = config.time_classifier_steps if time_cond else config.classifier_steps
    b = config.batch_size
    start = time.perf_counter()
    abar_cpu = abar.detach().float().cpu() if time_cond else None

    def loss_fn(step: int) -> torch.Tensor:
        loss = 0.0
        zs = source[_draw(len(source), b, g)].float()
        ts = None
        if time_cond:
            zs, ts, _ = _noised(zs, abar_cpu, g)
            ts = ts.to(device)
        out_s = model(zs.to(device), ts)
        for k, target in enumerate(targets):
            zt = target[_draw(len(target), b, g)].float()
            tt = None
            if time_cond:
                zt, tt, _ = _noised(zt, abar_cpu, g)
                tt = tt.to(device)
            out_t = model(zt.to(device), tt)[:, k]
            loss = loss + F.binary_cross_entropy_with_logits(out_t, torch.ones_like(out_t)) \
                + F.binary_cross_entropy_with_logits(out_s[:, k], torch.zeros_like(out_s[:, k]))
        return loss

    fit(model.parameters(), loss_fn, steps=steps, optimizer=opt, heartbeat=heartbeat)
    model.eval().requires_grad_(False)
    acc = None
    if not time_cond:  # balanced accuracy of each head on its training sets
        acc = []
        for k, target in enumerate(targets):
            s_logit = _batched(lambda z: model(z.to(device))[:, k], source)
            t_logit = _batched(lambda z: model(z.to(device))[:, k], target)
            acc.append(0.5 * ((s_logit < 0).float().mean().item() + (t_logit > 0).float().mean().item()))
    return {"accuracy": acc, "n_source": len(source), "n_target": [len(t) for t in targets],
            "seconds": time.perf_counter() - start, "steps": steps}


def _batched(fn, z: torch.Tensor, size: int = 512) -> torch.Tensor:
    return torch.cat([fn(z[i:i + size].float()).detach().cpu() for i in range(0, len(z), size)]) if len(z) else torch.zeros(0)


@torch.no_grad()
def ratios(classifier: DomainClassifier, z0: torch.Tensor, device="cpu") -> torch.Tensor:
    """r(z_0) for every head: [N, K] (on CPU)."""
    return _batched(lambda z: classifier.ratio(z.to(device)), z0)


def guided_eps_train(eps_model: Callable, h: GuidanceNet, z_t: torch.Tensor, t: torch.Tensor, abar: torch.Tensor,
                     y: torch.Tensor | None, head: int) -> torch.Tensor:
    """eps_source - sqrt(1 - abar_t) * grad log h_head, differentiable w.r.t. h's parameters: the guidance
    term's own grad_log with create_graph=True, combined as samplers.guided_eps does."""
    term = DensityRatioGuidance(h, 1.0, head=head, use_class=y is not None)
    cond = Condition(class_ids=y, domain_weights=torch.zeros(len(z_t), 0)) if y is not None else None
    grad = term.grad_log(z_t.detach(), t, cond, create_graph=True)
    with torch.no_grad():
        eps = eps_model(z_t, t, y)
    a = abar[t].view(-1, *[1] * (z_t.dim() - 1))
    return eps - (1 - a).sqrt() * grad


def train_guidance_net(h: GuidanceNet, source: torch.Tensor, source_ratios: torch.Tensor, abar: torch.Tensor, *,
                       source_labels: torch.Tensor | None = None, config: DensityRatioConfig = DensityRatioConfig(),
                       targets: Sequence[torch.Tensor] | None = None, target_labels: Sequence[torch.Tensor | None] | None = None,
                       eps_model: Callable | None = None, time_classifier: DomainClassifier | None = None,
                       device="cpu", heartbeat: Callable[[], None] | None = None) -> dict:
    """Regress h onto r(z_0) on noised source samples: mean_k ||h_k(z_t, t, y) - r_k(z_0)||^2, plus

    - consistency (``config.consistency_weight`` > 0; needs ``targets`` and ``eps_model(z_t, t, y) -> eps``
      of the source model): ||eps_source - sqrt(1-abar_t) grad log h_k - noise||^2 on noised target k samples;
    - cycle (``config.cycle_weight`` > 0; needs ``time_classifier`` c'(z_t, t) with K heads and ``targets``):
      ||h_k(z'_t, t) - r'_k(z'_t, t)||^2 on noised source and target samples, class hidden (c' has no class).
    """
    K = h.outputs
    if source_ratios.shape != (len(source), K):
        raise DfbenchError(f"source_ratios must be [{len(source)}, {K}], got {tuple(source_ratios.shape)}")
    use_cons, use_cycle = config.consistency_weight > 0, config.cycle_weight > 0
    if (use_cons or use_cycle) and (targets is None or len(targets) != K):
        raise DfbenchError(f"the consistency/cycle regularisers need {K} target sets")
    if use_cons and eps_model is None:
        raise DfbenchError("the consistency regulariser needs the source model's eps (eps_model)")
    if use_cycle and time_classifier is None:
        raise DfbenchError("the cycle regulariser needs a time-conditioned domain classifier (time_classifier)")
    g = torch.Generator().manual_seed(config.seed + 1)
    abar_cpu = abar.detach().float().cpu()
    abar_dev = abar_cpu.to(device)
    h.to(device).train()
    opt = torch.optim.Adam(h.parameters(), lr=config.h_lr)
    # linear decay to 0: the regression target is heavy-tailed, a constant rate leaves a noisy last iterate
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / max(1, config.h_steps))
    b = config.batch_size
    start = time.perf_counter()
    terms = {"regression": [], "consistency": [], "cycle": []}

    def loss_fn(step: int) -> torch.Tensor:
        i = _draw(len(source), b, g)
        z_t, t, _ = _noised(source[i].float(), abar_cpu, g, config.h_time_power)
        y = None
        if source_labels is not None and h.num_classes:
            y = source_labels[i].long().clone()
            y[torch.rand(b, generator=g) < config.class_dropout] = -1
            y = y.to(device)
        pred = h(z_t.to(device), t.to(device), y)
        loss = F.mse_loss(pred, source_ratios[i].to(device).float())
        terms["regression"].append(loss.item())
        if use_cons:
            cons = 0.0
            for k, target in enumerate(targets):
                j = _draw(len(target), b, g)
                zt_k, tk, noise = _noised(target[j].float(), abar_cpu, g)
                yk = None
                if target_labels is not None and target_labels[k] is not None and h.num_classes:
                    yk = target_labels[k][j].long().to(device)
                eps_g = guided_eps_train(eps_model, h, zt_k.to(device), tk.to(device), abar_dev, yk, k)
                cons = cons + F.mse_loss(eps_g, noise.to(device))
            cons = cons / K
            terms["consistency"].append(cons.item())
            loss = loss + config.consistency_weight * cons
        if use_cycle:
            pool = torch.cat([source[_draw(len(source), b, g)].float()]
                             + [tg[_draw(len(tg), b // K + 1, g)].float() for tg in targets])
            zc, tc, _ = _noised(pool, abar_cpu, g)
            zc, tc = zc.to(device), tc.to(device)
            with torch.no_grad():
                r_t = time_classifier.ratio(zc, tc)
            cyc = F.mse_loss(h(zc, tc, None), r_t)
            terms["cycle"].append(cyc.item())
            loss = loss + config.cycle_weight * cyc
        return loss

    fit(h.parameters(), loss_fn, steps=config.h_steps, optimizer=opt, schedule=schedule, heartbeat=heartbeat)
    h.eval().requires_grad_(False)
    tail = lambda v: sum(v[-50:]) / len(v[-50:]) if v else None
    return {"seconds": time.perf_counter() - start, "steps": config.h_steps,
            **{f"final_{k}": tail(v) for k, v in terms.items()}}


# ------------------------------------------------------------------------------------------------
# Guidance
# ------------------------------------------------------------------------------------------------

class DensityRatioGuidance(GuidanceTerm):
    """grad_{z_t} log h(z_t, t[, y]) for one head of ``h`` (``head``) or a convex mix of heads (``mix``).

    ``h``: a GuidanceNet, or anything with ``outputs``, ``num_classes`` and ``log_h(z_t, t, y, mix=None)``
    (e.g. an exact ratio in a test).
    ``use_class``: h sees the condition's class ids (the conditional version); otherwise the y = -1 head.
    """

    def __init__(self, h: GuidanceNet, weight: float = 1.0, *, head: int = 0, mix: Sequence[float] | None = None,
                 use_class: bool = True, cache_key: str | None = None):
        self.h, self.weight, self.cache_key = h, float(weight), cache_key
        self.use_class = use_class and bool(h.num_classes)
        K = h.outputs
        if mix is not None:
            mix_t = torch.as_tensor(list(mix), dtype=torch.float32)
            if mix_t.shape != (K,) or (mix_t < 0).any() or mix_t.sum() <= 0:
                raise DfbenchError(f"density-ratio mix must be {K} non-negative weights, not all zero; got {list(mix)}")
            self.mix = mix_t / mix_t.sum()
        else:
            if not 0 <= head < K:
                raise DfbenchError(f"guidance head {head} out of range: h has {K} heads")
            self.mix = None
        self.head = head

    def log_h(self, z_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        y = cond.class_ids.to(z_t.device) if (self.use_class and cond is not None) else None
        t = torch.as_tensor(t, device=z_t.device)
        t = t.expand(len(z_t)) if t.dim() == 0 else t
        if self.mix is not None:
            return self.h.log_h(z_t, t, y, self.mix.to(z_t.device))
        return self.h.log_h(z_t, t, y)[:, self.head]

    def grad_log(self, z_t: torch.Tensor, t: torch.Tensor, cond=None, create_graph: bool = False) -> torch.Tensor:
        with torch.enable_grad():
            z = z_t if (create_graph and z_t.requires_grad) else z_t.detach().float().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_h(z, t, cond).sum(), z, create_graph=create_graph)
        return grad
