"""MixStyle and EFDM (EFDMix): ERM with one shared style-mixing layer after chosen featurizer stages.

Hyperparameters (DESIGN.md section 4): ``mix_p`` (0.5), ``mix_alpha`` (0.1), ``mix_mode``
(crossdomain | random) and ``mix_stages``: ``auto`` (ResNet-18/34: layer1-3; ResNet-50 and deeper:
layer1-2, as the EFDM authors use; small CNN: block1-2), or stage names as a comma-separated string
or a JSON list, e.g. ``"layer1,layer2"``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchvision.models.resnet import Bottleneck

from domainfusion_bench.algorithms.base import Algorithm, register_algorithm
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.hparams import HParamSpace
from domainfusion_bench.networks import ResNetFeaturizer, StagedFeaturizer
from domainfusion_bench.networks.style_mixing import StyleMixing

AUTO_STAGES = {
    "cnn": ("block1", "block2"),
    "resnet_basic": ("layer1", "layer2", "layer3"),  # ResNet-18/34 (MixStyle's default)
    "resnet_bottleneck": ("layer1", "layer2"),  # ResNet-50+ (EFDM's choice)
}
# Random draws: prefixes of the early stages, named for the dataset's default backbone
# (small images -> the small CNN, otherwise a ResNet).
STAGE_CHOICES = {
    "cnn": ["block1", "block1,block2", "block1,block2,block3"],
    "resnet": ["layer1", "layer1,layer2", "layer1,layer2,layer3"],
}


def auto_stages(featurizer: StagedFeaturizer) -> tuple[str, ...]:
    if isinstance(featurizer, ResNetFeaturizer):
        bottleneck = isinstance(featurizer.stages["layer1"][0], Bottleneck)
        return AUTO_STAGES["resnet_bottleneck" if bottleneck else "resnet_basic"]
    return AUTO_STAGES["cnn"]


def resolve_stages(value: Any, featurizer: StagedFeaturizer) -> list[str]:
    """``mix_stages`` -> the stage names to insert after, checked against the featurizer."""
    if value == "auto":
        names = list(auto_stages(featurizer))
    elif isinstance(value, str):
        names = [s.strip() for s in value.split(",") if s.strip()]
    elif isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value):
        names = list(value)
    else:
        raise DfbenchError(f"mix_stages must be 'auto', a comma-separated string or a list of stage names, got {value!r}")
    unknown = [s for s in names if s not in featurizer.stage_names]
    if not names or unknown:
        raise DfbenchError(
            f"mix_stages {value!r} names no stage or unknown stage(s) {', '.join(unknown)}; "
            f"this featurizer has {', '.join(featurizer.stage_names)} (or use 'auto')"
        )
    return names


class StyleMixingAlgorithm(Algorithm):
    """ERM whose featurizer mixes feature statistics across samples during training."""

    RULE = "mixstyle"
    DDP_EXACT = False  # statistics are mixed between examples of a rank's slice, not of the global batch

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.mixer = StyleMixing(self.RULE, p=hparams["mix_p"], alpha=hparams["mix_alpha"], mix=hparams["mix_mode"])
        self.mix_stages = resolve_stages(hparams["mix_stages"], self.featurizer)
        for stage in self.mix_stages:  # one shared instance at every insertion point
            self.featurizer.insert_after(stage, self.mixer)

    @classmethod
    def hparam_space(cls, space: HParamSpace, dataset: type) -> None:
        super().hparam_space(space, dataset)
        space.add("mix_p", 0.5, lambda r: r.uniform(0.2, 0.8))
        space.add("mix_alpha", 0.1, lambda r: 10 ** r.uniform(-2, 0))
        space.add("mix_mode", "crossdomain")
        choices = STAGE_CHOICES["cnn" if getattr(dataset, "SMALL_IMAGES", False) else "resnet"]
        space.add("mix_stages", "auto", lambda r: choices[r.randint(len(choices))])

    def loss(self, minibatches):
        x = torch.cat([x for x, _ in minibatches])
        y = torch.cat([y for _, y in minibatches])
        domains = torch.cat([torch.full((len(xi),), i, dtype=torch.long) for i, (xi, _) in enumerate(minibatches)])
        with self.mixer.for_domains(domains):
            logits = self.predict(x)
        return F.cross_entropy(logits, y), {}


@register_algorithm("MixStyle")
class MixStyle(StyleMixingAlgorithm):
    """MixStyle (Zhou et al. 2021): mix instance mean/std of early features between domains."""

    RULE = "mixstyle"


@register_algorithm("EFDM")
class EFDM(StyleMixingAlgorithm):
    """EFDMix (Zhang et al. 2022): exact feature distribution matching by sorting, mixed between domains."""

    RULE = "efdm"
