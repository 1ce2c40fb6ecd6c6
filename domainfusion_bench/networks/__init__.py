from domainfusion_bench.networks.classifiers import build_classifier
from domainfusion_bench.networks.featurizers import (
    ResNetFeaturizer,
    SmallCNN,
    StagedFeaturizer,
    build_featurizer,
)

__all__ = ["build_classifier", "build_featurizer", "ResNetFeaturizer", "SmallCNN", "StagedFeaturizer"]
