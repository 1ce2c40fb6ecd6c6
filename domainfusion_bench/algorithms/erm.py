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


@register_algorithm("ERM-DiTiEnc")
class ERMDiTiEncoder(ERM):
    """ERM on the DiTi encoder's architecture, trained from scratch by cross-entropy alone: the control row
    beside DiTi-finetune (same network, no DiTi pre-training, no DiTi loss, no diffusion model), so a
    table shows how much of DiTi's lead is its encoder. Width and z size are DiTi's hyperparameters, so a
    sweep that sets them for DiTi sets them here too."""

    FAMILY = "ERM"  # a variant of ERM on the page (same hue, its own marker)

    @classmethod
    def hparam_space(cls, space, dataset):
        super().hparam_space(space, dataset)
        space.add("backbone", "diti_encoder")
        space.add("diti_encoder_width", 32)  # DiTi's defaults
        space.add("diti_z_dim", 512)
