"""Empirical risk minimisation: cross-entropy on the pooled minibatches of all training domains."""

import torch
import torch.nn.functional as F

from domainfusion_bench.algorithms.base import Algorithm, register_algorithm


@register_algorithm("ERM")
class ERM(Algorithm):
    """Empirical risk minimisation (Vapnik): the baseline every DG method must beat."""

    def loss(self, minibatches):
        x = torch.cat([x for x, _ in minibatches])
        y = torch.cat([y for _, y in minibatches])
        loss = F.cross_entropy(self.predict(x), y)
        return loss, {}
