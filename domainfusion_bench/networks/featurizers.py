"""Featurizers: a sequence of named stages, so layers (MixStyle, EFDM) can be inserted after any stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable
from urllib.parse import parse_qsl

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


TIMM_PREFIX = "timm:"
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


def backbone_options(text: str) -> tuple[str, dict]:
    """``name?key=value&key=value`` -> (name, options); values are JSON literals (``depth=2``,
    ``dims=[8,16,32,64]``) or else strings, so a backbone and its size fit in one hparam."""
    name, _, query = str(text).partition("?")
    options = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise DfbenchError(f"backbone options must read name?key=value&key=value, got {text!r}") from None
    for key, value in pairs:
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, options


class DiTiEncoderFeaturizer(nn.Module):
    """The DiTi encoder's architecture (diffusion/diti) as a plain featurizer, trained here like any other:
    model input -> [0, 1] images -> encoder -> z (``width`` and ``z_dim`` as DiTi's hyperparameters)."""

    def __init__(self, input_shape: tuple[int, ...], width: int = 32, z_dim: int = 512):
        super().__init__()
        from domainfusion_bench.diffusion.diti import DiTiEncoder, encoder_resolution

        self.encoder = DiTiEncoder(int(input_shape[0]), z_dim, width, encoder_resolution(input_shape))
        self.n_outputs = z_dim
        self.register_buffer("input_mean", torch.zeros(1, input_shape[0], 1, 1))
        self.register_buffer("input_std", torch.ones(1, input_shape[0], 1, 1))

    def set_input_normalization(self, normalization) -> None:
        if normalization is not None:
            mean, std = normalization
            self.input_mean.copy_(torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).expand_as(self.input_mean))
            self.input_std.copy_(torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1).expand_as(self.input_std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.float() * self.input_std + self.input_mean)


BACKBONES = ("auto", "cnn", *RESNETS, "diti_encoder", "timm:<model name>")


def build_featurizer(input_shape: tuple[int, ...], hparams: dict) -> nn.Module:
    """``backbone``: auto (small CNN below 64 px, else ResNet-50), cnn, resnet18, resnet50 (torchvision,
    DomainBed's), diti_encoder (DiTi's encoder architecture, from scratch) or timm:<model name>.
    ``timm:`` and ``diti_encoder`` take options after a ``?``: timm.create_model's keyword arguments
    (``timm:vit_tiny_patch16_224?img_size=32&depth=2``), the encoder's ``width`` and ``z_dim``."""
    backbone, options = backbone_options(hparams.get("backbone", "auto"))
    if backbone == "auto":
        backbone = "cnn" if input_shape[-1] < 64 else "resnet50"
    if options and not (backbone.startswith(TIMM_PREFIX) or backbone == "diti_encoder"):
        raise DfbenchError(f"backbone {backbone!r} takes no ?options (only timm:<name> and diti_encoder do)")
    if backbone == "cnn":
        return SmallCNN(input_shape[0], hparams.get("cnn_width", 128))
    if backbone in RESNETS:
        return ResNetFeaturizer(backbone, hparams.get("pretrained", "imagenet"), hparams.get("freeze_bn", True), input_shape[0])
    if backbone == "diti_encoder":
        unknown = sorted(set(options) - {"width", "z_dim"})
        if unknown:
            raise DfbenchError(f"diti_encoder takes the options width and z_dim, got {', '.join(unknown)}")
        width = options.get("width", hparams.get("diti_encoder_width", 32))
        z_dim = options.get("z_dim", hparams.get("diti_z_dim", 512))
        return DiTiEncoderFeaturizer(input_shape, int(width), int(z_dim))
    if backbone.startswith(TIMM_PREFIX) and len(backbone) > len(TIMM_PREFIX):
        from domainfusion_bench.networks.timm_backbones import TimmFeaturizer

        return TimmFeaturizer(backbone[len(TIMM_PREFIX):], hparams.get("pretrained", "imagenet"), tuple(input_shape), options)
    raise DfbenchError(f"unknown backbone {backbone!r}. Choices: {', '.join(BACKBONES)}")
