"""Training a validity classifier: the class-prior-weighted BCE on noised samples of a balanced set.

The paper's loss, alpha * mean_valid(-log C) + (1 - alpha) * mean_invalid(-log(1 - C)), has the pointwise
optimum C = sigmoid(logit_bal + log(alpha / (1 - alpha))), logit_bal the optimum of the plain balanced BCE.
We train that plain BCE and put log(alpha / (1 - alpha)) in the classifier as a fixed offset
(``ValidityClassifier.prior_logit``): the same optimum, but with alpha near 1 (a 97%-valid draw) the
weighted loss gives the invalid side a 3% weight and 150 Adam steps never leave the prior (measured on
DigitStyles: C = 0.98 for every image and class, |grad log C| ~ 1e-7).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from domainfusion_bench.diffusion.fitting import fit, tail_mean
from domainfusion_bench.diffusion.oracle_guidance.classifiers import ValidityClassifier
from domainfusion_bench.errors import DfbenchError


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
    losses = fit(module.parameters(), batch_loss, steps=steps, optimizer=opt, schedule=sched, heartbeat=heartbeat)
    module.eval().requires_grad_(False)
    return tail_mean(losses, max(1, len(losses) // 10))


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
                           f"{n_invalid} invalid (draw more samples per round, or change the judge's og_threshold)")
    alpha = n_valid / len(valid) if alpha is None else float(alpha)
    weight = alpha if config.prior_weighting else 0.5
    if not 0.0 < weight < 1.0:
        raise DfbenchError(f"the validity classifier's prior alpha must be in (0, 1), got {weight}")
    device = next(classifier.parameters()).device
    g = torch.Generator().manual_seed(int(config.seed))
    x0 = x0.float()
    labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long).cpu()

    def batch_loss(step: int) -> torch.Tensor:
        idx = _balanced_index(valid, config.batch_size, g)
        xt, t = noised(x0[idx].to(device), alphas_cumprod, g, clean)
        y = None if labels is None else labels[idx].to(device)
        return prior_weighted_bce(classifier(xt, t, y), valid[idx].to(device), 0.5)

    start = time.perf_counter()
    final = _fit(classifier, batch_loss, config.steps, config.lr, config.weight_decay, heartbeat)
    with torch.no_grad():  # the prior weighting: alpha's log-odds on top of the balanced logit
        classifier.prior_logit.fill_(math.log(weight / (1 - weight)))
    return {"n_valid": n_valid, "n_invalid": n_invalid, "alpha": alpha, "loss_weight": weight,
            "final_loss": final, "seconds": time.perf_counter() - start,
            "time_conditioned": classifier.time_conditioned, "clean": clean}
