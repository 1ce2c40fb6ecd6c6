"""With the constant learning rate (the default), the snapshot a long run saves at step n is the model a run
of n steps trains: how a shipped DDPM (a snapshot of a longer run) stays reproducible by `--steps n`."""

import torch

from domainfusion_bench.diffusion.backbones import PixelDDPMBackbone
from domainfusion_bench.diffusion.trainer import default_config, train_pixel_ddpm

from test_ddpm_sharing import Toy


def _config(steps):
    return default_config(Toy(), steps=steps, batch_size=4, block_out_channels=(8, 16), norm_num_groups=4)


def test_snapshot_at_step_n_is_the_n_step_model(tmp_path):
    assert _config(2).lr_schedule == "constant"
    train_pixel_ddpm(Toy(), [0, 1, 2], [3], config=_config(6), cache_dir=tmp_path / "long", progress=False,
                     workers=0, snapshot_every=3, snapshot_dir=tmp_path / "snaps")
    assert sorted(p.name for p in (tmp_path / "snaps").iterdir()) == ["step_3", "step_6"]
    short = train_pixel_ddpm(Toy(), [0, 1, 2], [3], config=_config(3), cache_dir=tmp_path / "short", progress=False,
                             workers=0).backbone
    snap = PixelDDPMBackbone.load(tmp_path / "snaps" / "step_3")
    assert snap.info["steps_done"] == 3
    for (name, a), b in zip(short.model.state_dict().items(), snap.model.state_dict().values()):
        assert torch.equal(a, b), name
