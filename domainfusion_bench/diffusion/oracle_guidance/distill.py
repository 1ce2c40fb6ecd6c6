"""Distillation of the round stack into one validity classifier (MSE on log-probabilities)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from domainfusion_bench.diffusion.oracle_guidance.classifiers import ValidityClassifier
from domainfusion_bench.diffusion.oracle_guidance.training import _fit, noised
from domainfusion_bench.errors import DfbenchError


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
