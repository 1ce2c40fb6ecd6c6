"""The validity judge J(x, y) (the paper's validity oracle O(x, y)): a classifier's probability of the intended
class against a threshold."""

from __future__ import annotations

from typing import Callable

import torch

from domainfusion_bench.errors import DfbenchError

Judge = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images, intended labels) -> bool [B] valid


def check_threshold(threshold: float) -> float:
    if not 0.0 < float(threshold) < 1.0:
        raise DfbenchError(f"validity judge threshold must be in (0, 1) (the judge's probability of the intended class "
                           f"that makes a sample valid), got {threshold}")
    return float(threshold)


class ClassifierJudge:
    """Validity rule: a sample is valid when the judging classifier's softmax probability of its intended
    class is at least ``threshold`` (0.5 by default: the class is recognised, clearly).

    ``classifier(x) -> logits [B, num_classes]`` takes what ``preprocess(images)`` makes of the images
    (default: the images as given, e.g. [0, 1] tensors at the classifier's resolution).
    """

    def __init__(self, classifier: Callable[[torch.Tensor], torch.Tensor], threshold: float = 0.5,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None, batch_size: int = 256,
                 device: torch.device | str | None = None):
        self.classifier = classifier
        self.threshold = check_threshold(threshold)
        self.preprocess = preprocess or (lambda x: x)
        self.batch_size = int(batch_size)
        self.device = device

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """p_judge(intended label | image), [B] on CPU."""
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        if len(labels) != len(images):
            raise DfbenchError(f"validity judge got {len(images)} images and {len(labels)} labels")
        out = []
        for start in range(0, len(images), self.batch_size):
            x = images[start:start + self.batch_size]
            if self.device is not None:
                x = x.to(self.device)
            logits = self.classifier(self.preprocess(x.float())).float()
            p = logits.softmax(1).gather(1, labels[start:start + len(x)].to(logits.device).view(-1, 1)).squeeze(1)
            out.append(p.cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.probabilities(images, labels) >= self.threshold


def invalid_rate(valid: torch.Tensor) -> float:
    valid = torch.as_tensor(valid, dtype=torch.bool)
    if len(valid) == 0:
        raise DfbenchError("invalid rate of zero samples is undefined: draw at least one sample")
    return float((~valid).float().mean())
