"""The algorithm API: ``update(minibatches)`` and ``predict(x)``, with the common case reduced to a loss.

A new algorithm usually needs only ``loss``; the base class owns the network, the optimiser, backward
and the step. Methods with several optimisers override ``update`` and still call ``self.backward``,
which the trainer points at its distributed/mixed-precision backward; the base ``update`` computes the
loss through ``self.loss_step`` when the trainer sets one (its DDP wrapper of ``loss``).
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
    # what kind of result a run is: "DG" (no held-out data of any kind), or a label that the tables print
    # beside the algorithm's name (an oracle row, a few-shot-target domain-adaptation row), so such a row
    # is never read as a DG result
    TRACK = "DG"
    # hyperparameters that make a run cheap but still exercise every part (the contract test, smoke runs)
    SMOKE_HPARAMS: dict[str, Any] = {}
    # under DDP (several processes): whether a step may leave some trainable parameters without a gradient
    # (DDP then searches the graph for them every step), and whether the run is then exactly the 1-process
    # run (True when the loss is a mean over examples; a loss that uses batch statistics or a sub-sample of
    # the batch sees only the rank's slice, so it is not)
    DDP_FIND_UNUSED = False
    DDP_EXACT: bool = True

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.num_domains = num_domains
        self.hparams = hparams
        self.featurizer = self.build_featurizer(self.input_shape, hparams)
        self.classifier = build_classifier(self.featurizer.n_outputs, num_classes, hparams["nonlinear_classifier"])
        # DomainBed's dropout sits after the ResNet features only; the small CNN has none.
        p = hparams["resnet_dropout"] if isinstance(self.featurizer, ResNetFeaturizer) else 0.0
        self.network = nn.Sequential(self.featurizer, nn.Dropout(p), self.classifier)
        self.backward: Callable[[torch.Tensor], None] = torch.Tensor.backward
        # what ``update`` computes the loss with: ``loss`` itself, or the trainer's distributed wrapper of it
        self.loss_step: Callable[[Minibatches], tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None

    @classmethod
    def build_featurizer(cls, input_shape: tuple[int, ...], hparams: dict[str, Any]) -> nn.Module:
        """The featurizer (needs ``n_outputs``). Override to supply another one (e.g. a DiTi encoder)."""
        return build_featurizer(input_shape, hparams)

    @classmethod
    def hparam_space(cls, space: HParamSpace, dataset: type) -> None:
        """Add this algorithm's hyperparameters to ``space`` (which holds the shared ones).

        Subclasses call ``super().hparam_space(space, dataset)`` first, then ``space.add(...)``.
        """

    def configure_optimizer(self, params=None) -> torch.optim.Optimizer:
        params = self.parameters() if params is None else params
        return torch.optim.Adam(params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])

    def setup_optimizers(self) -> None:
        """Called by the trainer once the model is on its device. Multi-optimiser methods override."""
        self.optimizer = self.configure_optimizer()

    # --- hooks for methods whose training data or state changes (generative methods) ------------------
    def prepare(self, context: Any) -> Any:
        """Called once before training, after the model is on its device, with the trainer's context
        (data splits, cached-model store, generation cache, cost and metric meters).

        Generative methods build their synthetic data here and may return replacement training
        datasets, one per training domain. The default uses the real data as it is.
        """
        return None

    def on_step(self, step: int, context: Any) -> Any:
        """Called before every training step. Return new training datasets (one per training domain) to
        train on them from this step on (the trainer rebuilds its batches), or None to keep the current ones."""
        return None

    def extra_state(self) -> dict[str, Any]:
        """State beyond parameters and optimisers (pools, counters) saved at every resume point: tensors,
        numbers, strings, bools, None, lists and dicts only (it is loaded with ``weights_only=True``)."""
        return {}

    def load_extra_state(self, state: dict[str, Any], context: Any) -> Any:
        """Restore ``extra_state()`` on resume; return the training datasets that state implies (or None)."""
        return None

    def loss(self, minibatches: Minibatches) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and named terms to log (detached tensors)."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss() or update()")

    def update(self, minibatches: Minibatches) -> dict[str, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        loss, terms = (self.loss_step or self.loss)(minibatches)
        self.backward(loss)
        self.optimizer.step()
        return {"loss": loss.detach(), **terms}

    def ddp_loss_weight(self, share: float, world: int) -> float:
        """Factor on this rank's loss under DDP (which averages gradients over ``world`` ranks), the rank
        holding ``share`` of the global batch. ``share * world`` makes a per-example mean the global mean;
        a loss that sums over examples would return ``world``."""
        return share * world

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {name: v for name, v in vars(self).items() if isinstance(v, torch.optim.Optimizer)}

    def resume_state(self) -> dict[str, Any]:
        return {"model": self.state_dict(), "optimizers": {k: o.state_dict() for k, o in self.optimizers().items()},
                "extra": self.extra_state()}

    def load_resume_state(self, state: dict[str, Any], context: Any = None) -> Any:
        """Restore a resume point; returns the training datasets the algorithm's extra state implies."""
        self.load_state_dict(state["model"])
        for name, opt_state in state["optimizers"].items():
            self.optimizers()[name].load_state_dict(opt_state)
        return self.load_extra_state(state.get("extra", {}), context)


ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm")
register_algorithm = ALGORITHMS.register
