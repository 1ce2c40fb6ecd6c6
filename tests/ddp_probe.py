"""Run in 2 CPU processes (torchrun) by tests/test_multiprocess.py: one training step of
algorithms through the trainer's set_up, counting Python-level all-reduces, then rank 0 writes what it saw
to the JSON file named by argv[1]. Not a test file itself (no test_ prefix)."""

import json
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from domainfusion_bench.algorithms import ALGORITHMS
from domainfusion_bench.training import Runtime, Speed, TrainArgs, resolve_hparams, set_up

ERM = ALGORITHMS.get("ERM")


class WithSpareParts(ERM):
    """ERM plus a trainable layer no step uses and a frozen helper model, as generative methods have."""

    DDP_FIND_UNUSED = True

    def __init__(self, *a):
        super().__init__(*a)
        self.spare = nn.Linear(4, 4)
        self.helper = nn.Linear(8, 8).requires_grad_(False)


class OwnUpdate(WithSpareParts):
    """Computes its loss itself, not through the trainer's loss step: the fallback averages gradients."""

    def update(self, minibatches):
        self.optimizer.zero_grad(set_to_none=True)
        loss, _ = self.loss(minibatches)
        self.backward(loss)
        self.optimizer.step()
        return {"loss": loss.detach()}


calls = [0]
_all_reduce = dist.all_reduce


def counting_all_reduce(*args, **kwargs):
    calls[0] += 1
    return _all_reduce(*args, **kwargs)


dist.all_reduce = counting_all_reduce  # accelerate's reduce calls it per tensor; DDP's reducer does not


def gathered(value: torch.Tensor) -> list[torch.Tensor]:
    both = [torch.zeros_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(both, value)
    return both


def rank_seeds(runtime) -> dict:
    """After ``seed_rank`` the ranks draw different dropout masks; rank 0 keeps the 1-process stream."""
    torch.manual_seed(3)
    expected = torch.rand(6)  # what one process draws after seeding with 3
    torch.manual_seed(3)
    runtime.seed_rank(3, step=0)
    mask = torch.nn.functional.dropout(torch.ones(6), 0.5)
    torch.manual_seed(3)
    runtime.seed_rank(3, step=0)
    drawn = gathered(torch.rand(6))
    return {"rank0_kept": bool(torch.equal(drawn[0], expected)), "ranks_differ": not torch.equal(drawn[0], drawn[1]),
            "masks_differ": not torch.equal(*gathered(mask))}


def resume_decision(runtime, out: str) -> dict:
    """A resume point rank 1 cannot judge for itself (as if it saw the file half-written): all ranks
    follow the main rank's decision, none restarts on its own."""
    from pathlib import Path

    from domainfusion_bench import runfiles
    from domainfusion_bench.training import resume

    path = Path(out).with_name("resume.pt")
    if runtime.is_main:
        runfiles.save_resume(path, {"step": 5, "w": torch.ones(3)})
    dist.barrier()
    real = runfiles.load_resume
    if not runtime.is_main:
        runfiles.load_resume = lambda p, map_location="cpu": None  # what a rank judging alone might conclude
    try:
        state = resume.load_agreed(runtime, path)
    finally:
        runfiles.load_resume = real
    steps = gathered(torch.tensor([-1 if state is None else state["step"]]))
    return {"steps": [int(s) for s in steps]}


def main(out: str) -> None:
    args = TrainArgs(dataset="RotatedDigits", algorithm="ERM", test_envs=[0], device="cpu", output_dir="unused",
                     hparams='{"batch_size": 8}')
    runtime = Runtime(args)
    hparams = resolve_hparams(args)
    report = {"world": runtime.world}
    for cls in (ERM, WithSpareParts, OwnUpdate):
        torch.manual_seed(0)
        algorithm = cls((1, 28, 28), 10, 2, hparams)
        context = SimpleNamespace(train_splits=[])
        set_up(algorithm, context, [], runtime, Speed())
        n_params = sum(1 for p in algorithm.parameters() if p.requires_grad)
        g = torch.Generator().manual_seed(100 + runtime.rank)  # each rank its own slice of the minibatch
        minibatches = [(torch.rand(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g))
                       for _ in range(2)]
        calls[0], flat_before = 0, getattr(runtime, "flat_all_reduces", 0)
        algorithm.update(minibatches)
        step_calls, flat = calls[0], getattr(runtime, "flat_all_reduces", 0) - flat_before
        grads = torch.cat([p.grad.reshape(-1) for p in algorithm.parameters() if p.grad is not None])
        both = [torch.zeros_like(grads) for _ in range(runtime.world)]
        dist.all_gather(both, grads)
        # the averaged gradient is the gradient of the whole minibatch (both ranks' slices) in one process
        xs = [[torch.zeros_like(x) for _ in range(runtime.world)] for x, _ in minibatches]
        ys = [[torch.zeros_like(y) for _ in range(runtime.world)] for _, y in minibatches]
        for (x, y), gx, gy in zip(minibatches, xs, ys):
            dist.all_gather(gx, x)
            dist.all_gather(gy, y)
        torch.manual_seed(0)
        alone = cls((1, 28, 28), 10, 2, hparams)
        alone.loss([(torch.cat(gx), torch.cat(gy)) for gx, gy in zip(xs, ys)])[0].backward()
        full = torch.cat([p.grad.reshape(-1) for p in alone.parameters() if p.grad is not None])
        weights = torch.cat([p.detach().reshape(-1) for p in algorithm.network.parameters()])
        both_w = [torch.zeros_like(weights) for _ in range(runtime.world)]
        dist.all_gather(both_w, weights)
        report[cls.__name__] = {
            "find_unused": runtime.ddp.find_unused_parameters,
            "ddp": type(getattr(runtime, "ddp", None)).__name__, "trainable_params": n_params, "all_reduce_calls": step_calls,
            "flat_all_reduces": flat, "grads_equal": bool(torch.equal(both[0], both[1])),
            "grads_are_full_batch": bool(torch.allclose(grads, full, rtol=1e-4, atol=1e-6)),
            "weights_equal": bool(torch.equal(both_w[0], both_w[1])),
            "spare_grad": None if not hasattr(algorithm, "spare") else algorithm.spare.weight.grad is not None,
        }
    report["seeds"] = rank_seeds(runtime)
    report["resume"] = resume_decision(runtime, out)
    if runtime.is_main:
        with open(out, "w") as f:
            json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()  # orderly gloo shutdown: left to interpreter exit, a loaded machine can abort a rank


if __name__ == "__main__":
    main(sys.argv[1])
