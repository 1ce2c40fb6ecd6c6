"""Validity classifiers as guidance terms for the project's guided sampler, one term per round of the stack."""

from __future__ import annotations

from typing import Sequence

import torch

from domainfusion_bench.diffusion.backbones import parameters_digest
from domainfusion_bench.diffusion.oracle_guidance.classifiers import ValidityClassifier
from domainfusion_bench.diffusion.samplers import GuidanceTerm, LogDensityGuidance


class ValidityGuidance(LogDensityGuidance):
    """grad_{z_t} log C(z_t, t, y) for the sampler's guidance sum (y = the condition's class ids); zero above
    the classifier's ``guide_max_t`` when it has one (``og_max_t``: where C cannot read the noisy image)."""

    def __init__(self, classifier: ValidityClassifier, weight: float = 1.0, name: str = "og"):
        self.classifier = classifier
        max_t = getattr(classifier, "guide_max_t", None)

        def log_g(z, t, cond):
            y = cond.class_ids.to(z.device) if classifier.num_classes else None
            value = classifier.log_prob(z, t, y)
            if max_t is None:
                return value
            t = torch.as_tensor(t, device=value.device).expand_as(value)
            return torch.where(t <= max_t, value, torch.zeros_like(value))

        key = f"{name}:{parameters_digest(classifier)[:20]}" + ("" if max_t is None else f":tmax={int(max_t)}")
        super().__init__(log_g, weight, cache_key=key)


def stack_terms(classifiers: Sequence[ValidityClassifier], weight: float, name: str = "og") -> list[GuidanceTerm]:
    """The round stack: sum_k w grad log C_k (one term per round; one extra evaluation each)."""
    return [ValidityGuidance(c, weight, f"{name}-round{k + 1}") for k, c in enumerate(classifiers)]
