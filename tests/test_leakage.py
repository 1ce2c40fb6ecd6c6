"""The leakage guard on text and on the explicit few-shot-target track."""

import pytest
import torch

from domainfusion_bench.diffusion import DDIMSampler, GenerationCache, LeakageGuard, Request, SamplerConfig
from domainfusion_bench.diffusion.cache import MANIFEST
from domainfusion_bench.diffusion.tiny import exact_backbone
from domainfusion_bench.errors import DfbenchError

PACS = ["art_painting", "cartoon", "photo", "sketch"]


def test_prompts_naming_a_held_out_domain_are_refused():
    guard = LeakageGuard("PACS", PACS, held_out=[0, 3])
    for text in ["A SKETCH of a dog", "a dog, an Art Painting", "art_painting style", "Sketch."]:
        with pytest.raises(DfbenchError, match="names held-out domain"):
            guard.check_text([text])
    # other domains, and words that merely contain the name, pass
    guard.check_text(["a dog, a cartoon", "a photo of a guitar", "sketches of houses", "", None])
    with pytest.raises(DfbenchError, match="'sketch' \\(index 3\\)"):
        guard.check_text(["ok", "a sketchy sketch"])
    LeakageGuard("PACS", PACS, held_out=[3], allow_condition=True).check_text(["a sketch"])  # the oracle may
    # descriptions count too; purely numeric names are matched through their description only
    rotated = LeakageGuard("RotatedMNIST", ["0", "15", "30"], held_out=[1])
    rotated.check_text(["a handwritten digit 15"])
    with pytest.raises(DfbenchError, match="rotated by 15 degrees"):
        rotated.check_text(["a digit rotated by 15 degrees"])
    with pytest.raises(DfbenchError, match="names held-out"):
        LeakageGuard("VLCS", ["Caltech101", "LabelMe", "SUN09", "VOC2007"], held_out=[2]).check_text(
            ["a chair, a photo of a cluttered scene"])


def test_backbone_and_cache_refuse_held_out_prompts_before_generating(tmp_path):
    backbone = exact_backbone(None).restrict([3])
    with pytest.raises(DfbenchError, match="a prompt names held-out domain 'sketch'"):
        backbone.condition(prompts=["a dog", "a pencil sketch"])
    sampler = DDIMSampler(backbone, SamplerConfig(steps=2))
    bad = [Request(class_id=0, domains={1: 1.0}, seed=1, prompt="a dog, a sketch")]
    with pytest.raises(DfbenchError, match="request's prompt names held-out domain 'sketch'"):
        GenerationCache(tmp_path / "gen").sample(sampler, bad, progress=False)
    assert not (tmp_path / "gen" / MANIFEST).exists()


def test_few_shot_target_allows_k_unlabelled_images_and_nothing_else():
    default = LeakageGuard("PACS", PACS, held_out=[3])
    with pytest.raises(DfbenchError, match="few-shot-target track"):
        default.check_target_images(1, labelled=False)
    guard = LeakageGuard("PACS", PACS, held_out=[3], few_shot_target=5)
    with pytest.raises(DfbenchError, match="unlabelled images only"):
        guard.check_target_images(1, labelled=True)
    guard.check_target_images(3, labelled=False)
    guard.check_target_images(2, labelled=False)
    with pytest.raises(DfbenchError, match="exceeds the few-shot-target budget k=5"):
        guard.check_target_images(1, labelled=False)
    assert guard.describe() == {"held_out": [3], "oracle": False, "few_shot_target": 5, "target_images_used": 5}
    assert default.describe() == {"held_out": [3], "oracle": False}
    # everything else is still refused in few-shot mode
    with pytest.raises(DfbenchError, match="train a diffusion model on"):
        guard.check_train([0, 3])
    with pytest.raises(DfbenchError, match="generate from images of"):
        guard.check_sources([3])
    with pytest.raises(DfbenchError, match="condition on"):
        guard.check_condition(torch.eye(4)[[3]])
    with pytest.raises(DfbenchError, match="few_shot_target must be >= 0"):
        LeakageGuard("PACS", PACS, held_out=[3], few_shot_target=-1)
    backbone = exact_backbone(None).restrict([3], few_shot_target=2)
    assert backbone.guard.few_shot_target == 2
    with pytest.raises(DfbenchError, match="generate from images of"):
        DDIMSampler(backbone, SamplerConfig(steps=2)).img2img(torch.rand(1, 3, 8, 8), backbone.condition(batch=1), 0.5,
                                                              [1], 3)
