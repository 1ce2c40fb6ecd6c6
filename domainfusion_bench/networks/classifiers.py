"""Classifier heads on top of a featurizer."""

from torch import nn


def build_classifier(in_features: int, num_classes: int, nonlinear: bool = False) -> nn.Module:
    if not nonlinear:
        return nn.Linear(in_features, num_classes)
    hidden = in_features // 2
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, num_classes)
    )
