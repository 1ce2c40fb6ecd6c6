"""Featurizers: a sequence of named stages, so layers (MixStyle, EFDM) can be inserted after any stage."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from torch import nn
import torchvision

from domainfusion_bench.errors import DfbenchError


class StagedFeaturizer(nn.Module):
    """``features = pool(stage_n(... stage_1(x)))``; ``insert_after(name, layer)`` adds a layer after a stage.

    One module instance may be inserted at several stages (it is then shared, as MixStyle's is).
    """

    n_outputs: int

    def __init__(self, stages: Iterable[tuple[str, nn.Module]], head: nn.Module, n_outputs: int):
        super().__init__()
        self.stages = nn.ModuleDict(stages)
        self.head = head
        self.n_outputs = n_outputs
        self.inserted = nn.ModuleDict()  # stage name -> layer applied to that stage's output

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages)

    def insert_after(self, stage: str, layer: nn.Module) -> None:
        if stage not in self.stages:
            raise DfbenchError(f"no stage {stage!r} to insert after; this featurizer has {', '.join(self.stages)}")
        self.inserted[stage] = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, stage in self.stages.items():
            x = stage(x)
            if name in self.inserted:
                x = self.inserted[name](x)
        return self.head(x)


class SmallCNN(StagedFeaturizer):
    """Four 3x3 conv blocks with GroupNorm, for 14-32 px inputs (the MNIST-sized datasets).

    ``width`` 128 is DomainBed's MNIST network (64, 128, 128, 128 channels); smaller widths make the
    embedded datasets fast on a CPU.
    """

    def __init__(self, in_channels: int, width: int = 128):
        def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=1), nn.ReLU(), nn.GroupNorm(8, cout))

        stages = [
            ("block1", block(in_channels, width // 2)),
            ("block2", block(width // 2, width, stride=2)),
            ("block3", block(width, width)),
            ("block4", block(width, width)),
        ]
        super().__init__(stages, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), n_outputs=width)


RESNETS = {"resnet18": (torchvision.models.resnet18, "ResNet18_Weights"), "resnet50": (torchvision.models.resnet50, "ResNet50_Weights")}


def _load_resnet(arch: str, pretrained: str) -> nn.Module:
    build, weights_enum = RESNETS[arch]
    if pretrained == "none":
        return build(weights=None)
    if pretrained == "imagenet":
        weights = getattr(torchvision.models, weights_enum).IMAGENET1K_V1
        try:
            return build(weights=weights)
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            raise DfbenchError(
                f"cannot load ImageNet weights for {arch} ({err}). Offline? Put the file {Path(weights.url).name} in "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'}, or pass --hparams '{{\"pretrained\": \"/path/to/{arch}.pth\"}}', "
                "or train from scratch with --hparams '{\"pretrained\": \"none\"}'."
            ) from None
    path = Path(pretrained)
    if not path.is_file():
        raise DfbenchError(f"pretrained weights file {path} does not exist (pretrained is 'imagenet', 'none' or a path)")
    model = build(weights=None)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


class ResNetFeaturizer(StagedFeaturizer):
    """torchvision ResNet without its fc; BatchNorm frozen in eval mode by default (the 2020 protocol)."""

    def __init__(self, arch: str, pretrained: str = "imagenet", freeze_bn: bool = True, in_channels: int = 3):
        net = _load_resnet(arch, pretrained)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        stages = [("stem", stem)] + [(f"layer{i}", getattr(net, f"layer{i}")) for i in range(1, 5)]
        super().__init__(stages, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), n_outputs=net.fc.in_features)
        self.freeze_bn = freeze_bn
        if freeze_bn:
            self.train()  # puts BatchNorm into eval mode

    def train(self, mode: bool = True) -> "ResNetFeaturizer":
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self


def build_featurizer(input_shape: tuple[int, ...], hparams: dict) -> StagedFeaturizer:
    """``backbone``: auto (small CNN below 64 px, else ResNet-50), cnn, resnet18 or resnet50."""
    backbone = hparams.get("backbone", "auto")
    if backbone == "auto":
        backbone = "cnn" if input_shape[-1] < 64 else "resnet50"
    if backbone == "cnn":
        return SmallCNN(input_shape[0], hparams.get("cnn_width", 128))
    if backbone in RESNETS:
        return ResNetFeaturizer(backbone, hparams.get("pretrained", "imagenet"), hparams.get("freeze_bn", True), input_shape[0])
    raise DfbenchError(f"unknown backbone {backbone!r}. Choices: auto, cnn, {', '.join(RESNETS)}")
