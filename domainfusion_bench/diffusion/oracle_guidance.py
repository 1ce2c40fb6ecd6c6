"""Oracle-assisted guidance ("Don't be so negative!", Naderiparizi et al., ICML 2024).

A validity oracle O(x, y) in {0, 1} says whether a generated sample is acceptable; for augmentation it
asks whether the sample still shows its intended class y (``ClassifierOracle``: an oracle classifier's
probability of y is at least a threshold). Each round:

1. draw samples with the current (guided) sampler and label them with O;
2. train a **time-conditioned** validity classifier C(x_t, t[, y]) on noised copies
   x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) n of a class-balanced valid/invalid set with the
   class-prior-weighted BCE  alpha * mean_valid(-log C) + (1 - alpha) * mean_invalid(-log(1 - C)),
   alpha = the valid fraction of this round's draw. Balancing gives the (often rare) invalid class
   enough examples; the weights undo the balancing, so the optimum is the calibrated posterior
   C*(x_t, t) = P(valid | x_t) under the current model, which is exactly the classifier-guidance
   factor that turns p(x) into p(x | valid). Without alpha the classifier is biased by
   log((1 - alpha) / alpha) and guidance over-pushes (fewer invalid samples, worse likelihood).
3. guide with eps - sqrt(1 - abar_t) * w * sum_k grad log C_k(x_t, t): rounds stack, each C_k
   correcting what the model guided by C_1..C_{k-1} still gets wrong.

Distillation (our choice, the paper leaves the form open): ONE validity classifier D(x_t, t[, y])
of the same architecture, trained to match the stack's summed log-probability
sum_k log C_k(x_t, t, y) (mean squared error on log D, targets floored at ``log_floor``) on noised
samples of every round's draw. Why a classifier and not an eps-correction network: guidance needs only
the gradient of a scalar, so a scalar network costs one forward+backward per step whatever K was, it
reuses the round classifiers' architecture and training loop, its output stays a probability (the
stack's P(valid)), and for images an eps-correction network would need an image-shaped output (a UNet)
for what is a one-number quantity. Matching log values (not soft-label BCE) weights errors where the
guidance acts: deep in the invalid region, where C is tiny and soft-label BCE would not care.

Sampling goes through the project's one guided-sampler path: the terms here are ``GuidanceTerm``s for
``samplers.DDIMSampler`` / ``guided_eps``. ``run_rounds`` drives the loop for any sampler: the caller
supplies ``draw(terms, name) -> (images, labels)``, so the same code serves a 2-D toy, CDGA's img2img
generation and any other generative method.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from domainfusion_bench.diffusion.backbones import parameters_digest
from domainfusion_bench.diffusion.samplers import GuidanceTerm, LogDensityGuidance
from domainfusion_bench.errors import DfbenchError

Oracle = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images, intended labels) -> bool [B] valid


# ------------------------------------------------------------------------------------------------
# The oracle
# ------------------------------------------------------------------------------------------------

def check_threshold(threshold: float) -> float:
    if not 0.0 < float(threshold) < 1.0:
        raise DfbenchError(f"oracle threshold must be in (0, 1) (the oracle's probability of the intended class "
                           f"that makes a sample valid), got {threshold}")
    return float(threshold)


class ClassifierOracle:
    """Validity rule: a sample is valid when the oracle classifier's softmax probability of its intended
    class is at least ``threshold`` (0.5 by default: the class is recognised, clearly).

    ``classifier(x) -> logits [B, num_classes]`` takes what ``preprocess(images)`` makes of the images
    (default: the images as given, e.g. [0, 1] tensors at the classifier's resolution).
    """

    def __init__(self, classifier: Callable[[torch.Tensor], torch.Tensor], threshold: float = 0.5,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None, batch_size: int = 256,
                 device: torch.device | str | None = None):
        self.classifier = classifier
        self.threshold = check_threshold(threshold)
        self.preprocess = preprocess or (lambda x: x)
        self.batch_size = int(batch_size)
        self.device = device

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """p_oracle(intended label | image), [B] on CPU."""
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        if len(labels) != len(images):
            raise DfbenchError(f"oracle got {len(images)} images and {len(labels)} labels")
        out = []
        for start in range(0, len(images), self.batch_size):
            x = images[start:start + self.batch_size]
            if self.device is not None:
                x = x.to(self.device)
            logits = self.classifier(self.preprocess(x.float())).float()
            p = logits.softmax(1).gather(1, labels[start:start + len(x)].to(logits.device).view(-1, 1)).squeeze(1)
            out.append(p.cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.probabilities(images, labels) >= self.threshold


def invalid_rate(valid: torch.Tensor) -> float:
    valid = torch.as_tensor(valid, dtype=torch.bool)
    if len(valid) == 0:
        raise DfbenchError("invalid rate of zero samples is undefined: draw at least one sample")
    return float((~valid).float().mean())


# ------------------------------------------------------------------------------------------------
# Time-conditioned validity classifiers C(x_t, t[, y])
# ------------------------------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int, num_train_timesteps: int) -> torch.Tensor:
    """Sinusoidal features of t / T (T = the schedule's length): [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1))
    angle = (t.float().view(-1, 1) / num_train_timesteps) * 1000.0 * freqs.view(1, -1)
    return torch.cat([angle.sin(), angle.cos()], dim=1)


class ValidityClassifier(nn.Module):
    """Base: ``forward(x_t, t, y=None) -> logit [B]`` of "valid"; ``log_prob`` = log C = logsigmoid.

    ``time_conditioned=False`` makes the network blind to t (the ablation: a plain classifier C(x));
    ``num_classes`` > 0 makes it class-conditional: the head has one logit per class (+1 for "no class",
    y = -1) and C(x_t, t, y) reads column y.
    """

    def __init__(self, num_classes: int, time_conditioned: bool, num_train_timesteps: int, emb_dim: int):
        super().__init__()
        self.num_classes = int(num_classes)
        self.time_conditioned = bool(time_conditioned)
        self.num_train_timesteps = int(num_train_timesteps)
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def time_features(self, t: torch.Tensor, n: int, device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if t.dim() == 0:
            t = t.expand(n)
        if not self.time_conditioned:
            t = torch.zeros_like(t)
        return self.time_mlp(timestep_embedding(t, self.emb_dim, self.num_train_timesteps))

    def pick(self, logits: torch.Tensor, y) -> torch.Tensor:
        if self.num_classes == 0 or y is None:
            return logits[:, -1]
        y = torch.as_tensor(y, device=logits.device).long().flatten()
        y = torch.where(y < 0, torch.full_like(y, self.num_classes), y)
        return logits.gather(1, y.view(-1, 1)).squeeze(1)

    def log_prob(self, x_t: torch.Tensor, t, y=None) -> torch.Tensor:
        return F.logsigmoid(self(x_t, t, y).float())


class PointValidityClassifier(ValidityClassifier):
    """MLP for points in R^d (the 2-D toys): [x, time features] -> SiLU layers -> logits."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, num_classes: int = 0,
                 time_conditioned: bool = True, num_train_timesteps: int = 1000, emb_dim: int = 32):
        super().__init__(num_classes, time_conditioned, num_train_timesteps, emb_dim)
        layers, width = [], dim + emb_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, self.num_classes + 1)

    def forward(self, x_t, t, y=None):
        x = x_t.float().flatten(1)
        h = self.body(torch.cat([x, self.time_features(t, len(x), x.device)], dim=1))
        return self.pick(self.head(h), y)


class ImageValidityClassifier(ValidityClassifier):
    """Small CNN on denoiser-space tensors [B, C, H, W] (pixels or latents); the time embedding is added
    per channel after each stage (the DDPM U-Net's way), global average pool, one logit per class."""

    def __init__(self, channels: int, num_classes: int = 0, width: int = 32, time_conditioned: bool = True,
                 num_train_timesteps: int = 1000, emb_dim: int = 64):
        super().__init__(num_classes, time_conditioned, num_train_timesteps, emb_dim)
        widths = [width, 2 * width, 2 * width]
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.embs = nn.ModuleList()
        c_in = channels
        for i, c in enumerate(widths):
            self.convs.append(nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1))
            self.norms.append(nn.GroupNorm(min(8, c), c))
            self.embs.append(nn.Linear(emb_dim, c))
            c_in = c
        self.head = nn.Linear(c_in, self.num_classes + 1)

    def forward(self, x_t, t, y=None):
        h = x_t.float()
        emb = self.time_features(t, len(h), h.device)
        for conv, norm, proj in zip(self.convs, self.norms, self.embs):
            h = F.silu(norm(conv(h)) + proj(emb)[:, :, None, None])
        return self.pick(self.head(h.mean((2, 3))), y)


# ------------------------------------------------------------------------------------------------
# Training: class-prior-weighted BCE on noised samples of a balanced set
# ------------------------------------------------------------------------------------------------

def prior_weighted_bce(logits: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * mean_valid(-log C) + (1 - alpha) * mean_invalid(-log(1 - C)), C = sigmoid(logits).

    On a balanced set (N valid, N invalid) this is alpha/N sum_valid + (1-alpha)/N sum_invalid; its
    pointwise optimum is alpha p_v / (alpha p_v + (1 - alpha) p_i) = P(valid | x) under the sampler.
    """
    valid = valid.bool()
    zero = logits.sum() * 0
    pos = F.softplus(-logits[valid]).mean() if valid.any() else zero
    neg = F.softplus(logits[~valid]).mean() if (~valid).any() else zero
    return alpha * pos + (1 - alpha) * neg


@dataclass(frozen=True)
class ClassifierTrainConfig:
    steps: int = 600
    batch_size: int = 256  # half valid, half invalid (the balanced set, minority drawn with replacement)
    lr: float = 5e-3
    weight_decay: float = 0.0
    prior_weighting: bool = True  # False: plain BCE on the balanced set (alpha = 1/2), the paper's ablation
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def noised(x0: torch.Tensor, alphas_cumprod: torch.Tensor, generator: torch.Generator,
           clean: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, t) with t ~ U{0..T-1} per sample (``clean``: t = 0 and x_t = x_0, for time-blind training)."""
    n = len(x0)
    if clean:
        return x0, torch.zeros(n, dtype=torch.long, device=x0.device)
    t = torch.randint(0, len(alphas_cumprod), (n,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    abar = alphas_cumprod.to(x0.device)[t].view(-1, *[1] * (x0.dim() - 1))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t


def _balanced_index(valid: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    pos, neg = valid.nonzero().flatten(), (~valid).nonzero().flatten()
    half = n // 2
    return torch.cat([pos[torch.randint(0, len(pos), (half,), generator=generator)],
                      neg[torch.randint(0, len(neg), (n - half,), generator=generator)]])


def _fit(module: nn.Module, batch_loss: Callable[[int], torch.Tensor], steps: int, lr: float, weight_decay: float,
         heartbeat: Callable[[], None] | None) -> float:
    """Adam with cosine decay on ``batch_loss(step)`` for ``steps``; leaves ``module`` frozen in eval mode.
    Returns the mean loss of the last tenth of the steps."""
    opt = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    module.train()
    losses = []
    for step in range(steps):
        loss = batch_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if heartbeat is not None and step % 50 == 0:
            heartbeat()
    module.eval().requires_grad_(False)
    tail = losses[-max(1, len(losses) // 10):] or [float("nan")]
    return sum(tail) / len(tail)


def train_validity_classifier(classifier: ValidityClassifier, x0: torch.Tensor, valid: torch.Tensor,
                              labels: torch.Tensor | None, alphas_cumprod: torch.Tensor,
                              config: ClassifierTrainConfig = ClassifierTrainConfig(), *,
                              alpha: float | None = None, clean: bool = False,
                              heartbeat: Callable[[], None] | None = None) -> dict[str, Any]:
    """Fit C on noised balanced batches of (x0, valid[, labels]) in place. ``alpha`` defaults to the valid
    fraction of ``valid`` (the draw's prior); ``clean`` trains on x_0 only (for the time-blind ablation).
    Returns what happened (counts, alpha, final loss, seconds)."""
    valid = torch.as_tensor(valid, dtype=torch.bool).cpu()
    n_valid, n_invalid = int(valid.sum()), int((~valid).sum())
    if n_valid == 0 or n_invalid == 0:
        raise DfbenchError(f"a validity classifier needs valid and invalid samples; got {n_valid} valid and "
                           f"{n_invalid} invalid (draw more samples per round, or change the oracle threshold)")
    alpha = n_valid / len(valid) if alpha is None else float(alpha)
    weight = alpha if config.prior_weighting else 0.5
    device = next(classifier.parameters()).device
    g = torch.Generator().manual_seed(int(config.seed))
    x0 = x0.float()
    labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long).cpu()

    def batch_loss(step: int) -> torch.Tensor:
        idx = _balanced_index(valid, config.batch_size, g)
        xt, t = noised(x0[idx].to(device), alphas_cumprod, g, clean)
        y = None if labels is None else labels[idx].to(device)
        return prior_weighted_bce(classifier(xt, t, y), valid[idx].to(device), weight)

    start = time.perf_counter()
    final = _fit(classifier, batch_loss, config.steps, config.lr, config.weight_decay, heartbeat)
    return {"n_valid": n_valid, "n_invalid": n_invalid, "alpha": alpha, "loss_weight": weight,
            "final_loss": final, "seconds": time.perf_counter() - start,
            "time_conditioned": classifier.time_conditioned, "clean": clean}


# ------------------------------------------------------------------------------------------------
# Guidance terms and distillation
# ------------------------------------------------------------------------------------------------

class ValidityGuidance(LogDensityGuidance):
    """grad_{z_t} log C(z_t, t, y) for the sampler's guidance sum (y = the condition's class ids)."""

    def __init__(self, classifier: ValidityClassifier, weight: float = 1.0, name: str = "og"):
        self.classifier = classifier

        def log_g(z, t, cond):
            y = cond.class_ids.to(z.device) if classifier.num_classes else None
            return classifier.log_prob(z, t, y)

        super().__init__(log_g, weight, cache_key=f"{name}:{parameters_digest(classifier)[:20]}")


def stack_terms(classifiers: Sequence[ValidityClassifier], weight: float, name: str = "og") -> list[GuidanceTerm]:
    """The round stack: sum_k w grad log C_k (one term per round; one extra evaluation each)."""
    return [ValidityGuidance(c, weight, f"{name}-round{k + 1}") for k, c in enumerate(classifiers)]


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 600
    batch_size: int = 256
    lr: float = 5e-3
    log_floor: float = -12.0  # targets below this are clipped: there C is "zero" and only the direction matters
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def distill_stack(student: ValidityClassifier, teachers: Sequence[ValidityClassifier], x0: torch.Tensor,
                  labels: torch.Tensor | None, alphas_cumprod: torch.Tensor,
                  config: DistillConfig = DistillConfig(), heartbeat: Callable[[], None] | None = None) -> dict[str, Any]:
    """Fit ``student`` in place so that log D(x_t, t, y) ~= sum_k log C_k(x_t, t, y) (MSE) on noised x0."""
    if not teachers:
        raise DfbenchError("nothing to distil: the stack has no round classifiers")
    device = next(student.parameters()).device
    g = torch.Generator().manual_seed(int(config.seed))
    x0 = x0.float()
    labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long).cpu()

    def batch_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(x0), (config.batch_size,), generator=g)
        xt, t = noised(x0[idx].to(device), alphas_cumprod, g)
        y = None if labels is None else labels[idx].to(device)
        with torch.no_grad():
            target = sum(c.log_prob(xt, t, y) for c in teachers).clamp(min=config.log_floor)
        return F.mse_loss(student.log_prob(xt, t, y), target)

    start = time.perf_counter()
    final = _fit(student, batch_loss, config.steps, config.lr, 0.0, heartbeat)
    return {"final_mse": final, "seconds": time.perf_counter() - start, "n_samples": len(x0),
            "teachers": len(teachers)}


# ------------------------------------------------------------------------------------------------
# The rounds
# ------------------------------------------------------------------------------------------------
# ------------------------------------------------------------------------------------------------

@dataclass
class RoundRecord:
    name: str  # what was measured: base, round1, ..., distilled
    n_samples: int
    n_invalid: int

    @property
    def invalid_rate(self) -> float:
        return self.n_invalid / max(1, self.n_samples)


@dataclass
class OracleGuidanceResult:
    classifiers: list[ValidityClassifier]
    distilled: ValidityClassifier | None
    records: list[RoundRecord]
    weight: float
    infos: list[dict[str, Any]] = field(default_factory=list)  # what each trained network reported
    samples_drawn: int = 0  # drawn in this call (cached rounds draw nothing)

    def stack(self, name: str = "og") -> list[GuidanceTerm]:
        return stack_terms(self.classifiers, self.weight, name)

    def terms(self, name: str = "og") -> list[GuidanceTerm]:
        """What a generation stage should guide with: the distilled network if any, else the stack."""
        if self.distilled is not None:
            return [ValidityGuidance(self.distilled, self.weight, f"{name}-distilled")]
        return self.stack(name)

    def rates(self) -> dict[str, float]:
        return {r.name: r.invalid_rate for r in self.records}


Draw = Callable[[Sequence[GuidanceTerm], str], tuple[torch.Tensor, torch.Tensor]]
# cached(kind, index, build, train) -> (trained module, info): where an algorithm puts its model store
Cached = Callable[[str, int, Callable[[], ValidityClassifier], Callable[[ValidityClassifier], dict]], tuple[ValidityClassifier, dict]]


def _uncached(kind, index, build, train):
    module = build()
    return module, train(module)


def run_rounds(draw: Draw, oracle: Oracle, encode: Callable[[torch.Tensor], torch.Tensor],
               new_classifier: Callable[[int], ValidityClassifier], rounds: int, weight: float = 1.0, *,
               alphas_cumprod: torch.Tensor, train_config: ClassifierTrainConfig = ClassifierTrainConfig(),
               distill: bool = False, distill_config: DistillConfig = DistillConfig(), measure_last: bool = True,
               cached: Cached = _uncached, heartbeat: Callable[[], None] | None = None,
               name: str = "og") -> OracleGuidanceResult:
    """Rounds of oracle-assisted guidance around any sampler.

    ``draw(terms, name) -> (images, labels)`` samples with the guidance ``terms``; ``oracle(images,
    labels)`` labels validity; ``encode(images)`` maps them to the denoiser space where C works;
    ``new_classifier(k)`` builds an untrained network (k = 0: the distilled one).

    Round k = 1..rounds draws with the stack C_1..C_{k-1} (its invalid rate is recorded as "base" for
    k = 1, else "round{k-1}"), then trains C_k on that draw. With ``distill``, one more draw measures the
    full stack ("round{rounds}") and, with the base draw, is the distillation data; the distilled network
    is then measured ("distilled"). Without ``distill``, ``measure_last`` draws once more to measure the
    full stack (an algorithm can skip it: its own generation measures that).

    Each trained network goes through ``cached(kind, k, build, train)`` ("round" or "distilled"): the draw
    happens inside ``train``, so a cached network costs no sampling, and its ``info`` carries the
    measurements (``n_samples``/``n_invalid`` per measured name) that make the records.
    """
    if rounds < 0:
        raise DfbenchError(f"oracle guidance rounds must be >= 0, got {rounds}")
    classifiers: list[ValidityClassifier] = []
    records: list[RoundRecord] = []
    infos: list[dict[str, Any]] = []
    pool: dict[str, torch.Tensor] = {}  # label -> (encoded draw, labels), only what was drawn in this call
    drawn = 0

    def measure(terms, label) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nonlocal drawn
        images, labels = draw(terms, label)
        valid = torch.as_tensor(oracle(images, labels), dtype=torch.bool).cpu()
        drawn += len(images)
        x0 = encode(images).detach().float().cpu()
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        pool[label] = (x0, labels)
        return x0, labels, valid

    def counts(label, valid) -> dict[str, Any]:
        return {"measured": {label: {"n_samples": len(valid), "n_invalid": int((~valid).sum())}}}

    def add_records(info):
        for label, c in info.get("measured", {}).items():
            records.append(RoundRecord(label, int(c["n_samples"]), int(c["n_invalid"])))

    for k in range(1, rounds + 1):
        label = "base" if k == 1 else f"round{k - 1}"
        stack = stack_terms(classifiers, weight, name)

        def train_round(c, stack=stack, label=label, k=k):
            x0, labels, valid = measure(stack, label)
            info = counts(label, valid)
            if valid.all() or not valid.any():
                # nothing to learn: all valid (nothing left to fix) or none valid (no direction)
                return {**info, "skipped": "all valid" if valid.all() else "none valid"}
            cfg = ClassifierTrainConfig(**{**train_config.to_json(), "seed": train_config.seed + k})
            return {**info, **train_validity_classifier(c, x0, valid, labels if c.num_classes else None,
                                                        alphas_cumprod, cfg, heartbeat=heartbeat)}

        c, info = cached("round", k, lambda k=k: new_classifier(k), train_round)
        infos.append(info)
        add_records(info)
        if info.get("skipped"):
            break
        classifiers.append(c)

    last = "base" if not classifiers else f"round{len(classifiers)}"
    distilled = None
    if distill and classifiers:
        def train_distilled(student):
            x_last, y_last, valid = measure(stack_terms(classifiers, weight, name), last)
            info = counts(last, valid)
            if "base" not in pool:  # round 1 came from a cache: draw the unguided samples again
                measure([], "base")
            x0 = torch.cat([pool["base"][0], x_last])
            y = torch.cat([pool["base"][1], y_last]) if student.num_classes else None
            info.update(distill_stack(student, classifiers, x0, y, alphas_cumprod, distill_config, heartbeat))
            _, _, valid_d = measure([ValidityGuidance(student, weight, f"{name}-distilled")], "distilled")
            info["measured"].update(counts("distilled", valid_d)["measured"])
            return info

        distilled, info = cached("distilled", len(classifiers), lambda: new_classifier(0), train_distilled)
        infos.append(info)
        add_records(info)
    elif measure_last and (not records or records[-1].name != last):
        _, _, valid = measure(stack_terms(classifiers, weight, name), last)
        add_records(counts(last, valid))
    return OracleGuidanceResult(classifiers, distilled, records, weight, infos, drawn)
