"""The one optimisation loop of the helper models (pixel DDPM, TGDP's classifiers and guidance network, OG's
validity classifiers, the validity judge, DiTi's encoder). Each caller keeps its own data, loss, optimizer
and schedule; the order of a step (zero_grad, backward, clip, optimizer, schedule, EMA) is fixed here, so
every helper's random stream and numbers are those of the loop it replaced."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

REPORT_EVERY = 20  # steps between progress-bar updates and heartbeats


def fit(params: Iterable[torch.nn.Parameter], loss_fn: Callable[[int], torch.Tensor], *, steps: int,
        optimizer: torch.optim.Optimizer, schedule=None, clip: float | None = None, ema=None,
        on_step: Callable[[int, list[float]], None] | None = None, heartbeat: Callable[[], None] | None = None,
        progress: bool = False, desc: str | None = None) -> list[float]:
    """Run ``steps`` optimizer steps on ``loss_fn(step)`` and return the per-step losses.

    ``params`` are what ``optimizer`` trains (the ones ``clip`` bounds the gradient norm of and ``ema``, a
    diffusers ``EMAModel``, averages); ``schedule`` is stepped after the optimizer; ``on_step(step, losses)``
    runs after each step (snapshots). Modes (train/eval) and anything after the last step are the caller's."""
    from tqdm.auto import tqdm

    params = list(params)
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=1.0, dynamic_ncols=True)
    for step in bar:
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        if schedule is not None:
            schedule.step()
        if ema is not None:
            ema.step(params)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses)
        if step % REPORT_EVERY == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-REPORT_EVERY:]) / len(losses[-REPORT_EVERY:]):.4f}")
            if heartbeat is not None:
                heartbeat()
    bar.close()
    return losses


def tail_mean(losses: list[float], n: int = 50) -> float:
    """The mean of the last ``n`` losses (nan when there are none): what the helpers report as final loss."""
    tail = losses[-n:] or [float("nan")]
    return sum(tail) / len(tail)
