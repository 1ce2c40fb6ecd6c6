"""The helper models' one optimisation loop: each step clips, steps the optimizer, then the schedule, then the
EMA, in that order (on a scalar whose every step can be worked out by hand)."""

import pytest
import torch
from diffusers.training_utils import EMAModel

from domainfusion_bench.diffusion.fitting import fit, tail_mean


def test_a_step_clips_then_steps_the_optimizer_the_schedule_and_the_ema():
    w = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([w], lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    ema = EMAModel([w], decay=0.99)
    seen, beats = [], []
    losses = fit([w], lambda step: 100 * w, steps=2, optimizer=opt, schedule=schedule, clip=1.0, ema=ema,
                 on_step=lambda step, ls: seen.append((step, list(ls))), heartbeat=lambda: beats.append(1))
    # gradient 100 clipped to norm 1; lr 1 then 0.5 (the schedule stepped after the first step)
    assert w.item() == pytest.approx(-1.5)
    assert losses == [0.0, -100.0] and seen == [(0, [0.0]), (1, [0.0, -100.0])]
    # diffusers' EMA (no warmup) copies the weights on its first update, then decays by 2/11: both updates come
    # after the optimizer's step, so the average is of -1 and -1.5
    assert ema.shadow_params[0].item() == pytest.approx(2 / 11 * -1.0 + 9 / 11 * -1.5)
    assert len(beats) == 2  # step 0 and the last step


def test_no_clip_no_schedule_no_ema_is_plain_descent():
    w = torch.nn.Parameter(torch.zeros(()))
    fit([w], lambda step: 100 * w, steps=2, optimizer=torch.optim.SGD([w], lr=0.01))
    assert w.item() == pytest.approx(-2.0)


def test_tail_mean():
    assert tail_mean([1.0, 2.0, 3.0], 2) == 2.5
    assert tail_mean([]) != tail_mean([])  # nan
