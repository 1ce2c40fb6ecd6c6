"""The pixel DDPM's joint null-condition drop: off by default and then out of the cache key (the shipped
model is still found), on it drops class and domain together in its share of rows."""

import pytest
import torch

from domainfusion_bench.data import get_dataset
from domainfusion_bench.diffusion import trainer
from domainfusion_bench.diffusion.backbones import PixelDDPMBackbone
from domainfusion_bench.diffusion.store import ModelStore
from domainfusion_bench.errors import DfbenchError

TINY = dict(batch_size=1000, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, attention=False,
            patch_size=2, shared_trials=0, ema_decay=0.0)


def inputs_seen(monkeypatch, **overrides):
    """(class ids, domain weights) the DDPM is trained on over 2 steps of 1000 rows."""
    ds = get_dataset("RotatedDigits", None)
    config = trainer.default_config(ds, steps=2, **TINY, **overrides)
    backbone = PixelDDPMBackbone.create(config.model, dataset=ds.name, domains=ds.domains, classes=ds.classes,
                                        image_channels=1)
    seen = []
    forward = type(backbone.model).forward

    def spy(self, z_t, t, class_ids, weights, extra=None):
        seen.append((class_ids.clone(), weights.clone()))
        return forward(self, z_t, t, class_ids, weights, extra)

    monkeypatch.setattr(type(backbone.model), "forward", spy)
    trainer._train(backbone, ds, [1, 2], 0, 0.2, config, torch.device("cpu"), False, 0)
    return torch.cat([y for y, _ in seen]), torch.cat([w for _, w in seen])


@pytest.mark.parametrize("null", [0.0, 0.3])
def test_joint_drop_hides_class_and_domain_together(monkeypatch, null):
    torch.set_num_threads(1)
    y, w = inputs_seen(monkeypatch, null_dropout=null)
    no_class, no_domain = y == -1, w.sum(1) == 0
    both = (no_class & no_domain).float().mean().item()
    expect = 0.1 * 0.1 + null * (1 - 0.1 * 0.1)  # independent cond_dropout drops, or the joint one
    assert both == pytest.approx(expect, abs=0.03), both
    assert no_class.float().mean().item() == pytest.approx(1 - 0.9 * (1 - null), abs=0.03)


def test_default_leaves_the_key_alone_and_a_joint_drop_changes_it():
    ds = get_dataset("DigitStyles", None)
    default = trainer.default_config(ds)
    assert "null_dropout" not in default.to_json() and default.null_dropout == 0
    store = ModelStore("unused")
    key = lambda c: store.key_of(store.identity("pixel_ddpm", **trainer.ddpm_where(ds, [0, 1, 3], 0, 0.2, c)))  # noqa: E731
    assert key(default) == key(trainer.default_config(ds, null_dropout=0.0))
    assert key(default) != key(trainer.default_config(ds, null_dropout=0.2))
    assert trainer.default_config(ds, null_dropout=0.2).to_json()["null_dropout"] == 0.2
    with pytest.raises(DfbenchError, match="null_dropout"):
        trainer.default_config(ds, null_dropout=1.5)
