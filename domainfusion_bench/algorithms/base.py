"""The algorithm API: ``update(minibatches)`` and ``predict(x)``, with the common case reduced to a loss.

A new algorithm usually needs only ``loss``; the base class owns the network, the optimiser, backward
and the step. Methods with several optimisers override ``update`` and still call ``self.backward``,
which the trainer points at its distributed/mixed-precision backward.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from domainfusion_bench.hparams import HParamSpace
from domainfusion_bench.networks import ResNetFeaturizer, build_classifier, build_featurizer
from domainfusion_bench.registry import Registry

Minibatches = Sequence[tuple[torch.Tensor, torch.Tensor]]  # one (x, y) per training domain


class Algorithm(nn.Module):
    NEEDS = "nothing"  # shown by `dfbench list`
    GENERATIVE = False  # True: has a generation stage whose cost is reported

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.num_domains = num_domains
        self.hparams = hparams
        self.featurizer = self.featurizer_override(self.input_shape, hparams) or build_featurizer(self.input_shape, hparams)
        self.classifier = build_classifier(self.featurizer.n_outputs, num_classes, hparams["nonlinear_classifier"])
        # DomainBed's dropout sits after the ResNet features only; the small CNN has none.
        p = hparams["resnet_dropout"] if isinstance(self.featurizer, ResNetFeaturizer) else 0.0
        self.network = nn.Sequential(self.featurizer, nn.Dropout(p), self.classifier)
        self.backward: Callable[[torch.Tensor], None] = torch.Tensor.backward

    @classmethod
    def hparam_space(cls, space: HParamSpace, dataset: type) -> None:
        """Add this algorithm's hyperparameters to ``space`` (which holds the shared ones).

        Subclasses call ``super().hparam_space(space, dataset)`` first, then ``space.add(...)``.
        """

    @classmethod
    def featurizer_override(cls, input_shape: tuple[int, ...], hparams: dict[str, Any]) -> nn.Module | None:
        """An algorithm's own featurizer (a module with ``n_outputs``), or None for the standard one."""
        return None

    def configure_optimizer(self, params=None) -> torch.optim.Optimizer:
        params = self.parameters() if params is None else params
        return torch.optim.Adam(params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])

    def setup_optimizers(self) -> None:
        """Called by the trainer once the model is on its device. Multi-optimiser methods override."""
        self.optimizer = self.configure_optimizer()

    def prepare(self, context: Any) -> Any:
        """Called once before training with the trainer's context (data splits, cache, cost meter).

        Generative methods build their synthetic data here and may return replacement training
        datasets, one per training domain. The default uses the real data as it is.
        """
        return None

    def loss(self, minibatches: Minibatches) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and named terms to log (detached tensors)."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss() or update()")

    def update(self, minibatches: Minibatches) -> dict[str, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        loss, terms = self.loss(minibatches)
        self.backward(loss)
        self.optimizer.step()
        return {"loss": loss.detach(), **terms}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {name: v for name, v in vars(self).items() if isinstance(v, torch.optim.Optimizer)}

    def resume_state(self) -> dict[str, Any]:
        return {"model": self.state_dict(), "optimizers": {k: o.state_dict() for k, o in self.optimizers().items()}}

    def load_resume_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["model"])
        for name, opt_state in state["optimizers"].items():
            self.optimizers()[name].load_state_dict(opt_state)


ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm")
register_algorithm = ALGORITHMS.register
