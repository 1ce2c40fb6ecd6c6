"""Featurizers: shapes, frozen BatchNorm, insertion hooks, weights loading and its offline error."""

import pytest
import torch
from torch import nn

from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.networks import ResNetFeaturizer, SmallCNN, build_featurizer


def test_small_cnn_shapes_and_width():
    net = SmallCNN(in_channels=3, width=32)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 32)
    assert SmallCNN(2)(torch.zeros(2, 2, 14, 14)).shape == (2, 128)  # DomainBed's MNIST width
    assert net.stage_names == ["block1", "block2", "block3", "block4"]


def test_resnet_batchnorm_stays_frozen_in_train_mode():
    net = ResNetFeaturizer("resnet18", pretrained="none")
    net.train()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    before = bns[0].running_mean.clone()
    net(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, bns[0].running_mean)
    unfrozen = ResNetFeaturizer("resnet18", pretrained="none", freeze_bn=False).train()
    assert all(m.training for m in unfrozen.modules() if isinstance(m, nn.BatchNorm2d))


def test_insert_after_stage_runs_the_layer_on_that_output():
    net = ResNetFeaturizer("resnet18", pretrained="none")
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape))
            return x

    probe = Probe()
    net.insert_after("layer1", probe)
    net.insert_after("layer3", probe)
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 512)
    assert seen == [(1, 64, 16, 16), (1, 256, 4, 4)]
    with pytest.raises(DfbenchError, match="no stage 'layer9'"):
        net.insert_after("layer9", probe)


def test_weights_from_a_local_file(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18()
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    loaded = ResNetFeaturizer("resnet18", pretrained=str(tmp_path / "r18.pth"))
    assert torch.equal(loaded.stages["stem"][0].weight, ref.conv1.weight)
    with pytest.raises(DfbenchError, match="does not exist"):
        ResNetFeaturizer("resnet18", pretrained=str(tmp_path / "missing.pth"))


def test_imagenet_weights_offline_give_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(DfbenchError, match="cannot load ImageNet weights for resnet50.*pretrained"):
        ResNetFeaturizer("resnet50", pretrained="imagenet")


def test_backbone_auto_picks_cnn_for_small_inputs():
    assert isinstance(build_featurizer((1, 28, 28), {"cnn_width": 32}), SmallCNN)
    assert isinstance(build_featurizer((3, 224, 224), {"backbone": "resnet18", "pretrained": "none"}), ResNetFeaturizer)
    with pytest.raises(DfbenchError, match="unknown backbone 'vgg'"):
        build_featurizer((3, 32, 32), {"backbone": "vgg"})
