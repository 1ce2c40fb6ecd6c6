"""Style and content of frozen deep features (the MODE decomposition, Dai et al., ICML 2023), and
DomainFusion's rule for making a pool image from its img2img candidates: the candidate with the most
similar content (c*) and the one with the most different style (s*) are recombined into one image.

For a feature map f [C, H, W] of a frozen network:
- style   = per-channel mean and standard deviation over the spatial positions, (mu, sigma) in R^2C;
- content = the instance-normalised map (f - mu) / sigma, flattened.
A per-channel affine change of the features (what a restyling mostly does at mid depth) moves the
style and leaves the content as it is.

Which frozen network (``StyleContentNet``): the ImageNet ResNet-50 (torchvision V1 weights, features
after ``layer2``) when its weights are on this machine, otherwise a frozen copy of the classifier's own
featurizer taken at the refresh (features after its middle stage). ``df_style_net`` picks one
explicitly; "auto" never downloads.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.networks.featurizers import StagedFeaturizer

STD_EPS = 1e-5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def style_content(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(style [B, 2C], content [B, C*H*W]) of feature maps [B, C, H, W]."""
    if features.dim() != 4:
        raise DfbenchError(f"style/content needs feature maps [B, C, H, W], got shape {tuple(features.shape)}")
    f = features.float()
    mu = f.mean(dim=(2, 3), keepdim=True)
    sigma = (f.var(dim=(2, 3), keepdim=True, unbiased=False) + STD_EPS).sqrt()
    content = ((f - mu) / sigma).flatten(1)
    return torch.cat([mu.flatten(1), sigma.flatten(1)], dim=1), content


def content_style_choice(reference: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c*, s*): for each reference image, the index of the candidate whose content is most similar to it
    (cosine of the content vectors) and of the one whose style is most different (Euclidean distance of the
    (mu, sigma) vectors). The two criteria act independently; ties go to the lower candidate index.

    ``reference`` [P, C, H, W]: features of the P pool images; ``candidates`` [P, N, C, H, W]: features of
    their N candidates.
    """
    if candidates.dim() != 5 or reference.dim() != 4 or candidates.shape[0] != reference.shape[0] \
            or candidates.shape[2:] != reference.shape[1:]:
        raise DfbenchError(f"content_style_choice needs reference [P, C, H, W] and candidates [P, N, C, H, W] "
                           f"with matching P, C, H, W; got {tuple(reference.shape)} and {tuple(candidates.shape)}")
    p, n = candidates.shape[:2]
    ref_style, ref_content = style_content(reference)
    cand_style, cand_content = style_content(candidates.flatten(0, 1))
    cand_style, cand_content = cand_style.view(p, n, -1), cand_content.view(p, n, -1)
    similarity = F.cosine_similarity(cand_content, ref_content.unsqueeze(1), dim=2)  # [P, N]
    distance = (cand_style - ref_style.unsqueeze(1)).norm(dim=2)  # [P, N]
    return similarity.argmax(dim=1), distance.argmax(dim=1)  # argmax returns the first of equal maxima


def recombine(content: torch.Tensor, style: torch.Tensor, style_weight: float = 1.0) -> torch.Tensor:
    """An image with the content of ``content`` and the style of ``style`` (both [B, C, H, W] in [0, 1]).

    The pixel-space form of MODE's decomposition (its decoder-free, Fourier variant): per channel, the
    phase of the 2-D spectrum carries the content and the amplitude the style, so the new image keeps the
    phase of ``content`` and takes the amplitude (1 - w) |F(content)| + w |F(style)|. MODE's feature-space
    form (the AdaIN swap (f_c - mu_c) / sigma_c * sigma_s + mu_s) needs a decoder trained back to pixels for
    the frozen network, which dfbench does not have; the selection above still reads deep features.
    ``recombine(x, x)`` is ``x``.
    """
    if content.shape != style.shape or content.dim() != 4:
        raise DfbenchError(f"recombine needs two image batches of one shape [B, C, H, W], got "
                           f"{tuple(content.shape)} and {tuple(style.shape)}")
    if not 0.0 <= style_weight <= 1.0:
        raise DfbenchError(f"the style weight (df_style_weight) must be in [0, 1], got {style_weight}")
    spec_c, spec_s = torch.fft.fft2(content.float()), torch.fft.fft2(style.float())
    amplitude = (1 - style_weight) * spec_c.abs() + style_weight * spec_s.abs()
    out = torch.fft.ifft2(torch.polar(amplitude, spec_c.angle())).real
    return out.clamp(0, 1)


def imagenet_weights_available(arch: str = "resnet50") -> bool:
    """Whether torchvision's ImageNet V1 weights for ``arch`` are already in the torch hub cache."""
    import torchvision

    enum = {"resnet18": "ResNet18_Weights", "resnet50": "ResNet50_Weights"}[arch]
    url = getattr(torchvision.models, enum).IMAGENET1K_V1.url
    return (Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name).is_file()


class StyleContentNet(nn.Module):
    """A frozen feature map for the style/content rule: ``forward(x01) -> [B, C, H, W]`` from images in [0, 1].

    Build it with ``imagenet()`` or ``from_featurizer(featurizer, to_input)``; ``choose(kind, ...)``
    applies the "auto" rule of the module docstring.
    """

    def __init__(self, stages: nn.Module, prepare, name: str):
        super().__init__()
        self.stages = stages.eval().requires_grad_(False)
        self.prepare = prepare  # [0, 1] images -> what ``stages`` takes
        self.name = name

    @torch.no_grad()
    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.stages(self.prepare(x01))

    @classmethod
    def imagenet(cls, arch: str = "resnet50", stage: str = "layer2") -> "StyleContentNet":
        from domainfusion_bench.networks.featurizers import ResNetFeaturizer

        net = ResNetFeaturizer(arch, "imagenet", freeze_bn=True)
        names = net.stage_names
        if stage not in names:
            raise DfbenchError(f"no stage {stage!r} in {arch}; choose one of {', '.join(names)}")
        stages = nn.Sequential(*[net.stages[s] for s in names[: names.index(stage) + 1]])
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

        def prepare(x01):
            x = x01.repeat(1, 3, 1, 1) if x01.shape[1] == 1 else x01
            return (x - mean.to(x.device)) / std.to(x.device)

        return cls(stages, prepare, f"imagenet-{arch}-{stage}")

    @classmethod
    def from_featurizer(cls, featurizer: nn.Module, to_input, stage: str | None = None) -> "StyleContentNet":
        """A frozen copy of ``featurizer`` up to ``stage`` (default: its middle stage); ``to_input`` maps
        [0, 1] images to the featurizer's input (the dataset's normalisation)."""
        if not isinstance(featurizer, StagedFeaturizer):
            raise DfbenchError(f"the style/content network needs a staged featurizer, got {type(featurizer).__name__}")
        names = featurizer.stage_names
        stage = stage or names[(len(names) - 1) // 2]
        if stage not in names:
            raise DfbenchError(f"no stage {stage!r} in the featurizer; choose one of {', '.join(names)}")
        frozen = copy.deepcopy(featurizer)
        layers = []
        for name in names[: names.index(stage) + 1]:
            layers.append(frozen.stages[name])
            if name in frozen.inserted:  # MixStyle-like layers are identity in eval mode; keep the order
                layers.append(frozen.inserted[name])
        return cls(nn.Sequential(*layers), to_input, f"featurizer-{stage}")

    @classmethod
    def choose(cls, kind: str, featurizer: nn.Module, to_input) -> "StyleContentNet":
        """``kind``: auto (ImageNet ResNet-50 if its weights are cached, else the featurizer), imagenet, featurizer."""
        if kind not in ("auto", "imagenet", "featurizer"):
            raise DfbenchError(f"df_style_net must be auto, imagenet or featurizer, got {kind!r}")
        if kind == "imagenet" or (kind == "auto" and imagenet_weights_available()):
            return cls.imagenet()
        return cls.from_featurizer(featurizer, to_input)
